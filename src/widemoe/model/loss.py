"""LM head and cross-entropy in one chunked pass, without the ``[N, V]`` logits.

`linear_cross_entropy(h, W, labels)` equals ``F.cross_entropy(h @ Wᵀ, labels, ignore_index=-100)`` (mean
over the non-ignored rows) but walks the rows in chunks: each chunk's logits are computed, reduced to
log-sum-exp and the target logit, and turned straight into the chunk's gradients (softmax − one-hot,
scaled by 1/n_valid), so the gradients of h and W are complete when the forward returns and only those
are kept (the approach of Liger Kernel's fused linear cross-entropy). What it saves:

- memory: the logits, their log-softmax and its gradient are never whole. At a real vocabulary (V=129k,
  4096 tokens per micro-batch) that is three 2 GB fp32 tensors;
- time: each chunk's logits stay in cache between the GEMM and the softmax; tiny preset, 16×256 tokens,
  V=4096, fp32 training step on the 2-core CPU: see benchmarks/train_step.py.

The backward multiplies the stored gradients by the incoming scalar gradient, so the loss must enter the
total loss linearly (as every loss in widemoe does). Under CPU/CUDA autocast the GEMMs run in the
autocast dtype, softmax and accumulation in fp32, the weight gradient in fp32 then the weight's dtype.

Also returns the per-token losses (detached, 0 at ignored rows) for per-domain statistics.
Shapes: N rows (tokens), D hidden, V vocabulary.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
_CHUNK_BYTES = 8 << 20  # fp32 logits per chunk: cache-resident at small V, bounded memory at large V


def _chunk_rows(vocab: int) -> int:
    return max(64, _CHUNK_BYTES // (4 * vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND: torch.Tensor, W_VD: torch.Tensor, labels_N: torch.Tensor,  # noqa: ANN001, ANN205
                ignore_index: int, compute_dtype: torch.dtype, want_grad: bool):
        # (needs_input_grad follows requires_grad even under no_grad: want_grad says whether to build grads)
        need_h, need_w = want_grad and ctx.needs_input_grad[0], want_grad and ctx.needs_input_grad[1]
        N, V = h_ND.shape[0], W_VD.shape[0]
        h, W = h_ND.to(compute_dtype), W_VD.to(compute_dtype)
        valid_N = labels_N != ignore_index
        n_valid = int(valid_N.sum())
        tok_N = torch.zeros(N, dtype=torch.float32, device=h.device)
        d_h = torch.empty_like(h) if need_h else None
        d_W = torch.zeros(W_VD.shape, dtype=torch.float32, device=W.device) if need_w else None
        step = _chunk_rows(V)
        for s in range(0, N, step):
            e = min(N, s + step)
            logits = (h[s:e] @ W.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            lab = labels_N[s:e]
            v = valid_N[s:e]
            safe = lab.clamp(min=0)
            tok_N[s:e] = (lse - logits.gather(1, safe[:, None]).squeeze(1)).masked_fill_(~v, 0.0)
            if not (need_h or need_w) or n_valid == 0:
                continue
            # d loss / d logits = (softmax - onehot) / n_valid on valid rows, 0 elsewhere (in place)
            g = logits.sub_(lse[:, None]).exp_()
            rows = torch.arange(e - s, device=g.device)
            g[rows, safe] -= 1.0
            g.mul_((v.float() / n_valid)[:, None])
            g = g.to(compute_dtype)
            if need_h:
                torch.mm(g, W, out=d_h[s:e])
            if need_w:
                gw = g.t() @ h[s:e]
                d_W += gw if gw.dtype == torch.float32 else gw.float()
        ctx.save_for_backward(d_h if need_h else None, d_W if need_w else None)
        ctx.dtypes = (h_ND.dtype, W_VD.dtype)
        loss = tok_N.sum() / n_valid if n_valid else tok_N.sum() * float("nan")  # as F.cross_entropy
        ctx.mark_non_differentiable(tok_N)
        return loss, tok_N

    @staticmethod
    def backward(ctx, g_loss: torch.Tensor, _g_tok: torch.Tensor):  # noqa: ANN205
        d_h, d_W = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        gh = (d_h * g_loss.to(d_h.dtype)).to(h_dtype) if d_h is not None else None
        gw = (d_W * g_loss).to(w_dtype) if d_W is not None else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(h_ND: torch.Tensor, W_VD: torch.Tensor, labels_N: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy of ``h @ Wᵀ`` against labels, per-token losses [N] detached); see the module."""
    dev = h_ND.device.type
    compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h_ND.dtype
    want_grad = torch.is_grad_enabled() and (h_ND.requires_grad or W_VD.requires_grad)
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(h_ND, W_VD, labels_N, ignore_index, compute, want_grad)


__all__ = ["IGNORE_INDEX", "linear_cross_entropy"]
