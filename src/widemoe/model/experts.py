"""Routed experts: stacked SwiGLU weights and the sort-once / grouped-compute / combine-once dispatch.

Weights use the transformers v5 layout: ``gate_up_proj [E, 2I, D]`` (rows 0:I gate, I:2I up) and
``down_proj [E, D, I]``. The dispatch follows torchtitan's `GroupedExperts` and the measurements in
shared/reference/cpu-performance*.md: sort the P = N·K (token, expert) pairs by expert once (stable, so
token order is kept inside a segment), run every expert on its contiguous segment, apply the combine
weights in fp32 and accumulate in fp32 once. Two executions of that recipe:

- `_SegmentFn` (CPU default, backends "threads" / "loop"): the sorted rows are cut into contiguous chunks
  of equal rows (an expert straddling a cut is split there; its dW parts are summed), one per
  single-threaded worker thread ("threads", as many as torch's intra-op threads) or one chunk run inline
  ("loop"). Each chunk gathers its rows, runs `_grouped_mm` over its experts (a per-expert loop when
  strides are unaligned), SwiGLU, fp32 weighting and an fp32 scatter-add into a worker-private
  accumulator. The backward runs in the same workers with whole-chunk gathers / elementwise passes and
  `_grouped_mm` for dA and dX, and one GEMM per expert for dW written straight into the [E, ...] grads:
  per-expert elementwise ops cost a GIL hand-off each (vs per-expert ops everywhere: MoE block
  forward+backward, quiet machine, T=2048, 7 round-robin reps: config a bf16 0.43 -> 0.49x of dense,
  b bf16 0.28 -> 0.38x, a/b fp32 +0-7%; tiny preset training step +6-8%).
- `_GroupedFn` (GPU default, backend "gmm"): whole sorted buffers through `torch._grouped_mm` (needs
  16-byte-aligned strides), un-permute gather + one fp32 batched GEMV to combine.

Both are hand-written `torch.autograd.Function`s: saved tensors are kept once, weight gradients are written
straight into [E, ...] buffers, and autograd never indexes a 3-D parameter as `W[e]` (each `SelectBackward`
zero-fills a tensor the size of the whole parameter: 40x slower backward at E=256, cpu-performance-detail
§5). Experts that receive no tokens get exactly-zero gradients. "autograd" (plain autograd through
`_grouped_mm` + `index_add`) is kept as a benchmark baseline.

Why "threads" on CPU (measured side by side, median of 3-7 round-robin reps, T=2048, 2 threads, on the
project's shared 2-core Xeon with AMX; see benchmarks/moe_layer.py):
- busy machine (load 5-8, the usual state here): "threads" vs `_grouped_mm`, config a fp32 forward 0.63x
  vs 0.27x of dense, forward+backward 0.65x vs 0.14x; config b bf16 forward+backward 0.35x vs 0.15x. Each
  small GEMM under 2-thread OpenMP waits at a barrier for a descheduled partner (2-thread 512x256 GEMMs:
  6 GFLOP/s, 1-thread: 20-30); single-threaded workers have no per-GEMM barrier.
- quiet machine (load ~2): fp32 within 5-10% of `_grouped_mm` (a fwd 0.72 vs 0.75, b fwd 0.64 vs 0.61,
  b fwd+bwd 0.65 vs 0.66), bf16 20-30% behind it (a fwd 0.35 vs 0.46). Set `impl="gmm"` on a dedicated
  machine running bf16. In bf16 the AMX GEMMs (~550 GFLOP/s per core) are so fast that the memory-bound
  gather / SwiGLU / fp32-combine passes dominate any unfused dispatch.

CPU bf16/fp16: oneDNN runs these GEMMs and compiles a kernel per shape, and routing makes new segment
lengths every batch; segments are padded to a multiple of `RoutedExperts.row_quantum` rows (pad rows
carry weight 0) so that the kernels repeat (see `plan_dispatch`). Under autocast the experts compute
in the autocast dtype.

Optional capacity (Switch Transformer / GShard): each expert keeps its first `capacity` pairs in token
order, overflow pairs are dropped (their token gets no contribution from that expert). The MoE block
passes a capacity only in training; dropless is the default.

Shapes: N tokens, D hidden, I expert width, E experts, K experts per token, P = N·K pairs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from widemoe.config import ModelConfig
from widemoe.model.expert_workers import plan_chunks, run_on_workers

IMPLS = ("auto", "gmm", "loop", "threads", "autograd")
# CPU bf16/fp16 expert segments are padded to multiples of at most this many rows (see `row_quantum`)
ONEDNN_MAX_QUANTUM = 64


class DispatchPlan(NamedTuple):
    order_P: torch.Tensor  # int64 pair index (into the flattened [N*K]) in expert-sorted order; N*K at pads
    tok_P: torch.Tensor  # int64 token of each sorted row (pads: token 0, with weight 0)
    inv_NK: torch.Tensor  # int64 [N*K]: sorted row of each pair; dropped pairs point at row P (zeros)
    counts_E: torch.Tensor  # int64 rows per expert (kept pairs, plus pads when padded)
    offs_E: torch.Tensor  # int32 cumulative segment ends (what _grouped_mm wants)
    dropped: int  # pairs dropped by the capacity limit
    pads: int = 0  # padding rows (see `plan_dispatch`'s ``pad_to``)
    quantum: int = 1  # every segment length is a multiple of this (``pad_to``)


def plan_dispatch(ids_NK: torch.Tensor, num_experts: int, capacity: int | None = None,
                  pad_to: int = 1) -> DispatchPlan:
    """Sort the token-expert pairs by expert once; optionally keep only `capacity` pairs per expert.

    ``pad_to > 1`` rounds every expert's segment up to a multiple of ``pad_to`` rows. Pad rows read token
    0 with routing weight 0, so they add exact zeros to outputs and gradients. Why: oneDNN, which runs
    CPU bf16/fp16 GEMMs, JIT-compiles a kernel per new shape, and routing gives new segment lengths every
    batch: with fresh routing per step, 480 kernel builds cost 1.28 s against 0.32 s of GEMMs (tiny preset
    MoE layer, bf16, 5 steps). Multiples of 32 rows repeat, so the kernels come from oneDNN's cache.
    """
    K = ids_NK.shape[1]
    flat_P = ids_NK.reshape(-1)
    order_P = flat_P.argsort(stable=True)
    counts_E = torch.bincount(flat_P, minlength=num_experts)
    dropped = 0
    if capacity is not None:
        starts_E = counts_E.cumsum(0) - counts_E
        rank_P = torch.arange(order_P.numel(), device=flat_P.device) - starts_E[flat_P[order_P]]
        keep_P = rank_P < capacity
        kept = int(keep_P.sum())
        dropped = order_P.numel() - kept
        if dropped:
            order_P = order_P[keep_P]
            counts_E = counts_E.clamp(max=capacity)
    P = order_P.numel()
    inv_NK = torch.full_like(flat_P, P) if dropped else torch.empty_like(flat_P)
    inv_NK[order_P] = torch.arange(P, device=flat_P.device)
    pads = 0
    if pad_to > 1 and P:
        padded_E = (counts_E + pad_to - 1) // pad_to * pad_to
        Q = int(padded_E.sum())
        pads = Q - P
        if pads:
            e_P = torch.repeat_interleave(torch.arange(num_experts, device=flat_P.device), counts_E)
            pos_P = (padded_E.cumsum(0) - padded_E)[e_P] + torch.arange(P, device=flat_P.device) \
                - (counts_E.cumsum(0) - counts_E)[e_P]
            order_Q = torch.full((Q,), flat_P.numel(), dtype=order_P.dtype, device=order_P.device)
            order_P = order_Q.index_copy_(0, pos_P, order_P)
            kept_NK = inv_NK < P
            inv_NK = torch.where(kept_NK, pos_P[inv_NK.clamp(max=P - 1)], Q)
            counts_E = padded_E
    tok_P = order_P // K
    if pads:
        tok_P.masked_fill_(order_P == flat_P.numel(), 0)
    offs_E = counts_E.cumsum(0).to(torch.int32)
    return DispatchPlan(order_P, tok_P, inv_NK, counts_E, offs_E, dropped, pads, max(1, pad_to))


def sorted_weights(w_NK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Routing weights in the plan's row order (fp32 as given); 0 at pad rows."""
    flat = w_NK.reshape(-1)
    if plan.pads:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat.index_select(0, plan.order_P)


def unsort_weight_grads(gw_P: torch.Tensor, plan: DispatchPlan, shape: torch.Size) -> torch.Tensor:
    """Gradients per sorted row back to ``[N, K]`` fp32; dropped pairs get 0, pad rows are discarded."""
    n = math.prod(shape)
    out = torch.zeros(n + (1 if plan.pads else 0), dtype=torch.float32, device=gw_P.device)
    out.index_copy_(0, plan.order_P, gw_P.float())
    return out[:n].view(shape)


def capacity_for(capacity_factor: float, num_tokens: int, k: int, num_experts: int) -> int:
    """Switch/GShard expert capacity: ceil(cf · N·K / E) pairs per expert."""
    return math.ceil(capacity_factor * num_tokens * k / num_experts)


# --------------------------------------------------------------------------------------------------
# Grouped GEMM helpers: `_grouped_mm` where its constraints hold, the same loop in Python elsewhere.


def gmm_supported(x: torch.Tensor, *dims: int) -> bool:
    """`_grouped_mm` needs every stride to be a multiple of 16 bytes, and a CUDA device of sm80+ for bf16."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if any((d * x.element_size()) % 16 for d in dims):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 8
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


def _clamp_(h_PF: torch.Tensor, I: int, limit: float | None) -> torch.Tensor:
    """DeepSeek-V4's SwiGLU clamp on the pre-activations, in place: gate <= limit, |up| <= limit."""
    if limit is not None:
        h_PF[:, :I].clamp_(max=limit)
        h_PF[:, I:].clamp_(min=-limit, max=limit)
    return h_PF


def _chunk_offs(jobs: list[tuple[int, int, int]], device: torch.device) -> tuple[int, int, torch.Tensor]:
    """A chunk's expert range [e0, e1) and its int32 `_grouped_mm` group ends, relative to its first row."""
    r0 = jobs[0][1]
    e0, e1 = jobs[0][0], jobs[-1][0] + 1
    ends = [0] * (e1 - e0)
    for e, s, n in jobs:
        ends[e - e0] = s + n - r0
    for i in range(1, len(ends)):  # empty experts inside the range: zero-length groups
        ends[i] = max(ends[i], ends[i - 1])
    return e0, e1, torch.tensor(ends, dtype=torch.int32, device=device)


def _segment_forward(x_ND, W1, W2, w_P, tok_P, chunks, save: bool,  # noqa: ANN001, ANN201
                     limit: float | None = None, workers: int = 1):
    """Fused forward per chunk of experts; returns (y_ND, per-chunk pre-activations h or None).

    Inside a chunk, aligned CPU shapes run `_grouped_mm` over the chunk's experts (one C++ loop: no Python
    or GIL hand-off per expert); other shapes loop over the experts. Rows, weights and outputs stay
    chunk-local; each chunk scatter-adds into its own fp32 accumulator.
    """
    I = W2.shape[-1]
    use_gmm = x_ND.device.type == "cpu" and gmm_supported(x_ND, W1.shape[-1], I)
    h_chunks: list[torch.Tensor | None] = [None] * len(chunks)
    # fp32: weight the [rows, I] activations before the down GEMM ((w·a)W = w·(aW), I <= D reads less);
    # other dtypes weight the fp32 outputs, so that the weights are applied in fp32
    fold_w = x_ND.dtype == torch.float32 and I <= W2.shape[1]

    def run(c: int, acc: torch.Tensor) -> None:
        jobs = chunks[c]
        r0, r1 = jobs[0][1], jobs[-1][1] + jobs[-1][2]
        tok = tok_P[r0:r1]
        xs = x_ND.index_select(0, tok)
        if use_gmm:
            e0, e1, offs = _chunk_offs(jobs, x_ND.device)
            h = _clamp_(torch._grouped_mm(xs, W1[e0:e1].transpose(-2, -1), offs=offs), I, limit)
            a = F.silu(h[:, :I]) * h[:, I:] if save else F.silu(h[:, :I], inplace=True).mul_(h[:, I:])
            if fold_w:
                a.mul_(w_P[r0:r1, None])
            ys = torch._grouped_mm(a, W2[e0:e1].transpose(-2, -1), offs=offs)
        else:
            h = xs.new_empty(r1 - r0, 2 * I)
            ys = xs.new_empty(r1 - r0, W2.shape[1])
            for e, s, n in jobs:
                hs = _clamp_(torch.mm(xs[s - r0:s - r0 + n], W1[e].t(), out=h[s - r0:s - r0 + n]), I, limit)
                a = F.silu(hs[:, :I]) * hs[:, I:]
                if fold_w:
                    a.mul_(w_P[s:s + n, None])
                torch.mm(a, W2[e].t(), out=ys[s - r0:s - r0 + n])
        if save:
            h_chunks[c] = h
        if not fold_w:
            ys = ys.float().mul_(w_P[r0:r1, None])
        acc.index_add_(0, tok, ys)

    acc = run_on_workers(run, len(chunks), workers, x_ND)
    y = acc[0]
    for extra in acc[1:]:
        y += extra  # type: ignore[operator]
    return y.to(x_ND.dtype), (h_chunks if save else None)


class _SegmentFn(torch.autograd.Function):
    """Chunked expert-parallel path (CPU): each worker thread gathers its chunk's rows, runs its experts,
    weights in fp32 and scatter-adds into a private fp32 [N, D] accumulator; accumulators are summed.

    Saved: x, the sorted weights and the pre-activations h [P, 2I]; the backward re-gathers x per chunk,
    recomputes a = silu(g)·u, and gets the routing-weight gradient as <gy·W2_e, a> without keeping ys.
    """

    @staticmethod
    def forward(ctx, x_ND, W1, W2, w_NK, plan: DispatchPlan, workers: int, limit=None):  # noqa: ANN001, ANN205
        w_P = sorted_weights(w_NK, plan)
        chunks = plan_chunks(plan, workers, max(W2.shape[1], W1.shape[1]), x_ND.element_size())
        y, h_chunks = _segment_forward(x_ND, W1, W2, w_P, plan.tok_P, chunks, save=True, limit=limit,
                                       workers=workers)
        ctx.save_for_backward(x_ND, W1, W2, w_P, *h_chunks)
        ctx.plan, ctx.chunks, ctx.wshape, ctx.limit, ctx.workers = plan, chunks, w_NK.shape, limit, workers
        return y

    @staticmethod
    def backward(ctx, gy_ND):  # noqa: ANN001, ANN205
        x_ND, W1, W2, w_P, *h_chunks = ctx.saved_tensors
        plan, chunks = ctx.plan, ctx.chunks
        tok_P, I, dtype = plan.tok_P, W2.shape[-1], x_ND.dtype
        need_x, need_w1, need_w2, need_w = ctx.needs_input_grad[:4]
        gy_ND = gy_ND.contiguous().to(dtype)
        d_W1 = torch.empty_like(W1) if need_w1 else None
        d_W2 = torch.empty_like(W2) if need_w2 else None
        for e, n in enumerate(plan.counts_E.tolist()):  # experts without tokens: exactly-zero gradients
            if n == 0:
                for g in (d_W1, d_W2):
                    if g is not None:
                        g[e].zero_()
        gw_P = torch.empty_like(w_P) if need_w else None
        # an expert split between two chunks: the later chunk writes its dW part privately, summed below
        firsts = {c: chunks[c][0][0] for c in range(1, len(chunks))
                  if chunks[c - 1][-1][0] == chunks[c][0][0]}
        part_W1 = {c: torch.empty_like(W1[e]) for c, e in firsts.items()} if need_w1 else {}
        part_W2 = {c: torch.empty_like(W2[e]) for c, e in firsts.items()} if need_w2 else {}

        use_gmm = x_ND.device.type == "cpu" and gmm_supported(x_ND, W1.shape[-1], I)

        def mm_rows(c: int, a_RK: torch.Tensor, W: torch.Tensor, transpose: bool) -> torch.Tensor:
            """a_RK's rows times their expert's W (or Wᵀ): `_grouped_mm` or a per-expert loop."""
            jobs, r0 = chunks[c], chunks[c][0][1]
            if use_gmm:
                e0, e1, offs = _chunk_offs(jobs, x_ND.device)
                We = W[e0:e1].transpose(-2, -1) if transpose else W[e0:e1]
                return torch._grouped_mm(a_RK, We, offs=offs)
            out = a_RK.new_empty(a_RK.shape[0], W.shape[-2] if transpose else W.shape[-1])
            for e, s, n in jobs:
                torch.mm(a_RK[s - r0:s - r0 + n], W[e].t() if transpose else W[e], out=out[s - r0:s - r0 + n])
            return out

        def run(c: int, dx: torch.Tensor | None) -> None:
            # whole-chunk gathers and elementwise passes (few Python ops: the GIL is handed between the
            # workers once per op); per-expert GEMMs only where dW is written straight into [E, ...]
            jobs = chunks[c]
            r0, r1 = jobs[0][1], jobs[-1][1] + jobs[-1][2]
            tok, w, h = tok_P[r0:r1], w_P[r0:r1, None], h_chunks[c]
            sg = F.silu(h[:, :I])
            a = sg * h[:, I:]
            gys = gy_ND.index_select(0, tok)  # unweighted d y of these rows
            da = mm_rows(c, gys, W2, transpose=False)  # = gy · W2_e, so <da, a> = <gy, ys> = d w
            if need_w:
                gw_P[r0:r1] = (da * a).sum(-1) if dtype == torch.float32 else (da.float() * a.float()).sum(-1)
            wd = w.to(dtype)
            if need_w2:
                a.mul_(wd)
                for e, s, n in jobs:  # Σ (w·gy)ᵀ a
                    split = firsts.get(c) == e and s == r0
                    torch.mm(gys[s - r0:s - r0 + n].t(), a[s - r0:s - r0 + n],
                             out=part_W2[c] if split else d_W2[e])
            dh = torch.empty_like(h)
            _swiglu_backward(da.mul_(wd), h, dh, I, ctx.limit, silu_g=sg)
            del da, a, sg
            if need_w1:
                xs = x_ND.index_select(0, tok)
                for e, s, n in jobs:
                    split = firsts.get(c) == e and s == r0
                    torch.mm(dh[s - r0:s - r0 + n].t(), xs[s - r0:s - r0 + n],
                             out=part_W1[c] if split else d_W1[e])
            if need_x:
                dxs = mm_rows(c, dh, W1, transpose=False)
                dx.index_add_(0, tok, dxs if dxs.dtype == torch.float32 else dxs.float())

        dx_acc = run_on_workers(run, len(chunks), ctx.workers, x_ND if need_x else None)
        for c, e in firsts.items():
            if need_w1:
                d_W1[e] += part_W1[c]
            if need_w2:
                d_W2[e] += part_W2[c]
        dx = None
        if need_x:
            dx = dx_acc[0]
            for extra in dx_acc[1:]:
                dx += extra
            dx = dx.to(dtype)
        gw_NK = None
        if need_w:
            gw_NK = unsort_weight_grads(gw_P, plan, ctx.wshape)  # dropped pairs get 0
        return dx, d_W1, d_W2, gw_NK, None, None, None


def _swiglu_backward(da_PI: torch.Tensor, h_PF: torch.Tensor, dh_PF: torch.Tensor, I: int,
                     limit: float | None = None, silu_g: torch.Tensor | None = None) -> None:
    """dh = d[silu(g) * u]: d up = da · silu(g); d gate = silu'(g) · da · u (ATen's fused silu_backward,
    few passes matter in bf16). Overwrites da; `silu_g`: silu(g) if the caller has it already. With the V4
    clamp, h holds the clamped values and the gradient stops where the clamp was active (values at the
    limit)."""
    g, u = h_PF[:, :I], h_PF[:, I:]
    torch.mul(da_PI, F.silu(g) if silu_g is None else silu_g, out=dh_PF[:, I:])
    torch.ops.aten.silu_backward.grad_input(da_PI.mul_(u), g, grad_input=dh_PF[:, :I])
    if limit is not None:
        dh_PF[:, :I].masked_fill_(g >= limit, 0)
        dh_PF[:, I:].masked_fill_(u.abs() >= limit, 0)


def _unpermute(ys_PD: torch.Tensor, inv_NK: torch.Tensor, K: int) -> torch.Tensor:
    """Rows back to token order, [N, K, D]. A gather (parallel, cache-friendly), not a scatter-add:
    `index_add_` over P rows was 2-5x slower than this on the 2-core CPU."""
    if inv_NK.numel() and int(inv_NK.max()) == ys_PD.shape[0]:  # capacity drops: row P is all zeros
        ys_PD = torch.cat([ys_PD, ys_PD.new_zeros(1, ys_PD.shape[1])])
    return ys_PD.index_select(0, inv_NK).view(-1, K, ys_PD.shape[1])


def _combine(ys_NKD: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """y_n = Σ_k w_nk · ys_nk as one batched GEMV, weights and accumulation in fp32."""
    if ys_NKD.dtype != torch.float32:
        ys_NKD = ys_NKD.float()
    return torch.bmm(w_NK.unsqueeze(1), ys_NKD).squeeze(1)


class _GroupedFn(torch.autograd.Function):
    """y = Σ_k w_k · SwiGLU_{e_k}(x) over whole sorted buffers with `torch._grouped_mm` (GPU path; on CPU
    when forced): one gather, grouped GEMMs, one fp32 combine; hand-written backward.

    Saved once: the gathered rows [P, D], the pre-activations [P, 2I] and activations [P, I], and the
    token-ordered expert outputs (fp32, for the routing-weight gradient). The backward writes dW straight
    into [E, ...] gradients and never builds autograd's copies for chunk / silu / mul / index_add.
    """

    @staticmethod
    def forward(ctx, x_ND, W1, W2, w_NK, plan: DispatchPlan, limit=None):  # noqa: ANN001, ANN205
        I, offs = W2.shape[-1], plan.offs_E
        xs_PD = x_ND.index_select(0, plan.tok_P)
        h_PF = _clamp_(torch._grouped_mm(xs_PD, W1.transpose(-2, -1), offs=offs), I, limit)
        a_PI = F.silu(h_PF[:, :I]) * h_PF[:, I:]
        ys_PD = torch._grouped_mm(a_PI, W2.transpose(-2, -1), offs=offs)
        ys_NKD = _unpermute(ys_PD, plan.inv_NK, w_NK.shape[1])
        del ys_PD
        if ys_NKD.dtype != torch.float32:
            ys_NKD = ys_NKD.float()
        y_ND = _combine(ys_NKD, w_NK).to(x_ND.dtype)
        ctx.save_for_backward(W1, W2, w_NK, xs_PD, h_PF, a_PI, ys_NKD)
        ctx.plan, ctx.limit = plan, limit
        return y_ND

    @staticmethod
    def backward(ctx, gy_ND):  # noqa: ANN001, ANN205
        W1, W2, w_NK, xs_PD, h_PF, a_PI, ys_NKD = ctx.saved_tensors
        plan = ctx.plan
        I, offs, K, dtype = W2.shape[-1], plan.offs_E, w_NK.shape[1], xs_PD.dtype
        need_x, need_w1, need_w2, need_w = ctx.needs_input_grad[:4]
        gy_ND = gy_ND.contiguous()
        # d w_nk = <gy_n, ys_nk>
        gw_NK = torch.bmm(ys_NKD, gy_ND.float().unsqueeze(-1)).squeeze(-1) if need_w else None
        del ys_NKD
        w_P = sorted_weights(w_NK, plan).to(dtype)
        gys_PD = gy_ND.to(dtype).index_select(0, plan.tok_P).mul_(w_P.unsqueeze(-1))  # d ys = w · gy[token]
        d_W2 = torch._grouped_mm(gys_PD.t(), a_PI, offs=offs) if need_w2 else None
        da_PI = torch._grouped_mm(gys_PD, W2, offs=offs)
        del gys_PD
        dh_PF = torch.empty_like(h_PF)
        _swiglu_backward(da_PI, h_PF, dh_PF, I, ctx.limit)
        del da_PI
        d_W1 = torch._grouped_mm(dh_PF.t(), xs_PD, offs=offs) if need_w1 else None
        dx_ND = None
        if need_x:
            dx_NKD = _unpermute(torch._grouped_mm(dh_PF, W1, offs=offs), plan.inv_NK, K)
            dx_ND = dx_NKD.sum(1) if dtype == torch.float32 else dx_NKD.sum(1, dtype=torch.float32).to(dtype)
        return dx_ND, d_W1, d_W2, gw_NK, None, None


def _autograd_dispatch(x_ND, gate_up_EFD, down_EDI, w_NK, plan: DispatchPlan,  # noqa: ANN001
                       limit: float | None = None) -> torch.Tensor:
    """The plain recipe under autograd (gather, two `_grouped_mm`, fp32 index_add): benchmark baseline."""
    inter = down_EDI.shape[-1]
    w_P = sorted_weights(w_NK, plan)
    xs_PD = x_ND.index_select(0, plan.tok_P)
    h_PF = torch._grouped_mm(xs_PD, gate_up_EFD.transpose(-2, -1), offs=plan.offs_E)
    g, u = h_PF[:, :inter], h_PF[:, inter:]
    if limit is not None:  # out of place: autograd's clamp gradient
        g, u = g.clamp(max=limit), u.clamp(min=-limit, max=limit)
    ys_PD = torch._grouped_mm(F.silu(g) * u, down_EDI.transpose(-2, -1), offs=plan.offs_E)
    yw_PD = ys_PD.float() * w_P.unsqueeze(-1)
    y_ND = torch.zeros(x_ND.shape[0], x_ND.shape[1], dtype=torch.float32, device=x_ND.device)
    return y_ND.index_add(0, plan.tok_P, yw_PD).to(x_ND.dtype)


class RoutedExperts(nn.Module):
    """E stacked SwiGLU experts and the dispatch. `forward` returns (y_ND, dropped_pairs)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = E, D, I
        self.initializer_range = config.initializer_range
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.impl = "auto"  # one of IMPLS; tests and benchmarks force a path
        self.swiglu_limit = config.swiglu_limit  # DeepSeek-V4 clamp (None: plain SwiGLU), every path
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up_proj, std=self.initializer_range)
        nn.init.normal_(self.down_proj, std=self.initializer_range)

    def row_quantum(self, x_ND: torch.Tensor, pairs: int) -> int:
        """Rows each expert segment is padded to a multiple of (see `plan_dispatch`): where oneDNN runs the
        GEMMs (CPU bf16 and fp16; it compiles a kernel per shape) a power of two near 1/8 of the mean
        segment, 8 to 64 rows: ~6% padding, and ~12 lengths per GEMM kind to compile once; else 1."""
        if not (x_ND.device.type == "cpu" and x_ND.dtype in (torch.bfloat16, torch.float16)):
            return 1
        mean = pairs / self.num_experts
        return min(ONEDNN_MAX_QUANTUM, max(8, 1 << max(0, int(math.log2(max(mean, 1) / 8)))))

    def backend_for(self, x_ND: torch.Tensor) -> str:
        """The path `impl="auto"` takes (see the module docstring for the measurements behind it)."""
        aligned = gmm_supported(x_ND, self.hidden_size, self.intermediate_size)
        if self.impl == "auto":
            if x_ND.device.type == "cpu":
                return "threads" if torch.get_num_threads() > 1 else "loop"
            return "gmm" if aligned else "loop"
        if self.impl in ("gmm", "autograd") and not aligned:
            return "loop"
        return self.impl

    def forward(
        self,
        x_ND: torch.Tensor,
        topk_ids_NK: torch.Tensor,
        topk_weights_NK: torch.Tensor,
        capacity: int | None = None,
    ) -> tuple[torch.Tensor, int]:
        if self.impl not in IMPLS:
            raise ValueError(f"RoutedExperts.impl={self.impl!r} must be one of {IMPLS}")
        w_NK = topk_weights_NK.float()
        W1, W2 = self.gate_up_proj, self.down_proj
        # Under autocast the experts compute in the autocast dtype, as autocast's own matmuls do (it does not
        # reach into the custom Functions, so the cast is here; autograd casts the weight gradients back).
        # With the segments padded for oneDNN (`row_quantum`) this made the tiny preset's bf16-autocast
        # training step 18% faster than fp32 experts (938 -> 770 ms, 2-core CPU, same process); unpadded,
        # the per-shape kernel builds made it 48% slower.
        dev = x_ND.device.type
        if torch.is_autocast_enabled(dev) and W1.dtype == torch.float32:
            dt = torch.get_autocast_dtype(dev)
            if dt != torch.float32:
                W1, W2 = W1.to(dt), W2.to(dt)
        x_ND = x_ND.to(W1.dtype)
        quantum = self.row_quantum(x_ND, topk_ids_NK.numel())
        plan = plan_dispatch(topk_ids_NK, self.num_experts, capacity, pad_to=quantum)
        if plan.order_P.numel() == 0:  # N = 0, or everything dropped: zeros, graph kept connected
            zero = ((W1.sum() + W2.sum()) * 0).to(x_ND.dtype) + (w_NK.sum() * 0).to(x_ND.dtype)
            return x_ND * 0 + zero, plan.dropped
        backend = self.backend_for(x_ND)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x_ND, w_NK, W1, W2))
        if (self.impl == "auto" and backend == "threads" and not grad and x_ND.dtype == torch.bfloat16
                and gmm_supported(x_ND, self.hidden_size, self.intermediate_size)):
            # bf16 inference: the whole-buffer grouped GEMM measured 11-17% faster than the expert
            # threads on configs a, b, c of benchmarks/moe_layer.py (quiet 2-core machine).
            backend = "gmm"
        lim = self.swiglu_limit
        if backend in ("gmm", "autograd") and not grad:
            y = _grouped_nograd(x_ND, W1, W2, w_NK, plan, lim)
        elif backend == "autograd":
            y = _autograd_dispatch(x_ND, W1, W2, w_NK, plan, lim)
        elif backend == "gmm":
            y = _GroupedFn.apply(x_ND, W1, W2, w_NK, plan, lim)
        else:
            workers = torch.get_num_threads() if backend == "threads" else 1
            if grad:
                y = _SegmentFn.apply(x_ND, W1, W2, w_NK, plan, workers, lim)
            else:  # not through apply: ctx.needs_input_grad is True under no_grad, we must not save
                chunks = plan_chunks(plan, workers, max(W2.shape[1], W1.shape[1]), x_ND.element_size())
                w_P = sorted_weights(w_NK, plan)
                y, _ = _segment_forward(x_ND, W1, W2, w_P, plan.tok_P, chunks, save=False, limit=lim,
                                        workers=workers)
        return y, plan.dropped

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, D={self.hidden_size}, I={self.intermediate_size}, impl={self.impl}"


@torch.no_grad()
def _grouped_nograd(x_ND, W1, W2, w_NK, plan: DispatchPlan, limit=None) -> torch.Tensor:  # noqa: ANN001
    I, offs = W2.shape[-1], plan.offs_E
    h_PF = torch._grouped_mm(x_ND.index_select(0, plan.tok_P), W1.transpose(-2, -1), offs=offs)
    _clamp_(h_PF, I, limit)
    a_PI = F.silu(h_PF[:, :I], inplace=True).mul_(h_PF[:, I:])  # in place: no extra [P, I] buffers
    ys_PD = torch._grouped_mm(a_PI, W2.transpose(-2, -1), offs=offs)
    del h_PF, a_PI
    return _combine(_unpermute(ys_PD, plan.inv_NK, w_NK.shape[1]), w_NK).to(x_ND.dtype)


def reference_moe(
    x_ND: torch.Tensor,
    gate_up_EFD: torch.Tensor,
    down_EDI: torch.Tensor,
    ids_NK: torch.Tensor,
    weights_NK: torch.Tensor,
    swiglu_limit: float | None = None,
) -> torch.Tensor:
    """Test oracle: a plain loop over experts and their tokens, no sorting, fp32 accumulation.
    ``swiglu_limit``: DeepSeek-V4's clamp (gate <= limit, |up| <= limit), out of place (autograd's gradient).

    Uses `unbind(0)` (one view per expert) rather than `W[e]`, so its backward is usable in tests.
    """
    inter = down_EDI.shape[-1]
    y_ND = torch.zeros(x_ND.shape, dtype=torch.float32, device=x_ND.device)
    for e, (wgu, wd) in enumerate(zip(gate_up_EFD.unbind(0), down_EDI.unbind(0))):
        tok, slot = torch.nonzero(ids_NK == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x_ND[tok] @ wgu.t()
        g, u = h[:, :inter], h[:, inter:]
        if swiglu_limit is not None:
            g, u = g.clamp(max=swiglu_limit), u.clamp(min=-swiglu_limit, max=swiglu_limit)
        out = (F.silu(g) * u) @ wd.t()
        y_ND = y_ND.index_add(0, tok, out.float() * weights_NK[tok, slot].float().unsqueeze(-1))
    return y_ND.to(x_ND.dtype)


__all__ = ["DispatchPlan", "IMPLS", "RoutedExperts", "capacity_for", "gmm_supported", "plan_dispatch",
           "reference_moe"]
