"""Routed experts: stacked SwiGLU weights and the sort-once / grouped-compute / combine-once dispatch.

Weights use the transformers v5 layout: ``gate_up_proj [E, 2I, D]`` (rows 0:I gate, I:2I up) and
``down_proj [E, D, I]``. The dispatch follows torchtitan's `GroupedExperts` and the measurements in
shared/reference/cpu-performance*.md:

1. sort the P = N·K (token, expert) pairs by expert once (stable, so token order is kept inside a segment),
2. gather the token rows once and run every expert on its contiguous segment, either with
   `torch._grouped_mm` (ATen loops one GEMM per group on CPU; CUTLASS on GPUs) or a Python segment loop,
3. multiply by the combine weights in fp32 and scatter-add once into an fp32 [N, D] accumulator.

Under autograd the routed computation is one hand-written `torch.autograd.Function` (`_RoutedExpertsFn`):
it saves the permutation, the gathered rows, the pre-activations and the expert outputs once, and writes
the weight gradients straight into [E, ...] buffers with grouped GEMMs. Autograd through per-expert
indexing of a 3-D parameter (`W[e]`) is never used: each `SelectBackward` materialises a zero tensor
the size of the whole parameter (40x slower backward at E=256, see cpu-performance-detail.md §5).
Experts that receive no tokens get exactly-zero gradients.

Path choice (`RoutedExperts.impl = "auto"`), measured by benchmarks/moe_layer.py on the 2-core CPU:
- autograd needed: `_RoutedExpertsFn` with grouped GEMMs (segment-loop GEMMs when shapes are not
  16-byte aligned, which `_grouped_mm` requires);
- no grad: the grouped-GEMM forward for fp32 and bf16 when aligned; the segment loop otherwise.

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

IMPLS = ("auto", "gmm", "loop", "autograd")


class DispatchPlan(NamedTuple):
    order_P: torch.Tensor  # int64 pair index (into the flattened [N*K]) in expert-sorted order
    tok_P: torch.Tensor  # int64 token of each sorted pair
    inv_NK: torch.Tensor  # int64 [N*K]: sorted position of each pair; dropped pairs point at row P (zeros)
    counts_E: torch.Tensor  # int64 pairs kept per expert
    offs_E: torch.Tensor  # int32 cumulative segment ends (what _grouped_mm wants)
    dropped: int  # pairs dropped by the capacity limit


def plan_dispatch(ids_NK: torch.Tensor, num_experts: int, capacity: int | None = None) -> DispatchPlan:
    """Sort the token-expert pairs by expert once; optionally keep only `capacity` pairs per expert."""
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
    offs_E = counts_E.cumsum(0).to(torch.int32)
    return DispatchPlan(order_P, order_P // K, inv_NK, counts_E, offs_E, dropped)


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


def _gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, counts: list[int] | None) -> torch.Tensor:
    """Grouped GEMM. a [P, k] x b [E, k, n] -> [P, n]; or a [m, P] x b [P, n] -> [E, m, n] (weight grad).

    `counts` given means: use the Python segment loop (unaligned shapes, or forced by the caller).
    """
    if counts is None:
        return torch._grouped_mm(a, b, offs=offs)
    if b.dim() == 3:  # rows of `a` grouped
        out = a.new_empty(a.shape[0], b.shape[-1])
        s = 0
        for e, n in enumerate(counts):
            if n:
                torch.mm(a[s:s + n], b[e], out=out[s:s + n])
            s += n
        return out
    out = a.new_zeros(len(counts), a.shape[0], b.shape[-1])  # reduction dim grouped (empty -> zero grad)
    s = 0
    for e, n in enumerate(counts):
        if n:
            torch.mm(a[:, s:s + n], b[s:s + n], out=out[e])
        s += n
    return out


def _silu_mul(h_PF: torch.Tensor, inter: int) -> torch.Tensor:
    return F.silu(h_PF[:, :inter]) * h_PF[:, inter:]


def _unpermute(ys_PD: torch.Tensor, inv_NK: torch.Tensor, K: int) -> torch.Tensor:
    """Rows back to token order, [N, K, D]. A gather (parallel, cache-friendly), not a scatter-add:
    `index_add_` over P rows was 2-5x slower than this on the 2-core CPU."""
    if inv_NK.numel() and int(inv_NK.max()) == ys_PD.shape[0]:  # capacity drops: row P is all zeros
        ys_PD = torch.cat([ys_PD, ys_PD.new_zeros(1, ys_PD.shape[1])])
    return ys_PD.index_select(0, inv_NK).view(-1, K, ys_PD.shape[1])


def _combine(ys_NKD: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
    """y_n = Σ_k w_nk · ys_nk as one batched GEMV, weights and accumulation in fp32, cast back."""
    if ys_NKD.dtype != torch.float32:
        ys_NKD = ys_NKD.float()
    return torch.bmm(w_NK.unsqueeze(1), ys_NKD).squeeze(1)


class _RoutedExpertsFn(torch.autograd.Function):
    """y = Σ_k w_k · SwiGLU_{e_k}(x): one gather, grouped GEMMs, one fp32 combine; hand-written backward.

    Saved once: the gathered rows, the pre-activations [P, 2I] and the token-ordered expert outputs
    (fp32). The backward computes dW with grouped GEMMs straight into [E, ...] gradients and never
    builds the intermediate copies autograd makes for chunk / silu / mul / index_add.
    """

    @staticmethod
    def forward(ctx, x_ND, gate_up_EFD, down_EDI, w_NK, plan: DispatchPlan, counts):  # noqa: ANN001, ANN205
        inter = down_EDI.shape[-1]
        K = w_NK.shape[1]
        xs_PD = x_ND.index_select(0, plan.tok_P)
        h_PF = _gmm(xs_PD, gate_up_EFD.transpose(-2, -1), plan.offs_E, counts)
        ys_PD = _gmm(_silu_mul(h_PF, inter), down_EDI.transpose(-2, -1), plan.offs_E, counts)
        ys_NKD = _unpermute(ys_PD, plan.inv_NK, K)
        del ys_PD
        if ys_NKD.dtype != torch.float32:
            ys_NKD = ys_NKD.float()
        y_ND = _combine(ys_NKD, w_NK).to(x_ND.dtype)
        ctx.save_for_backward(gate_up_EFD, down_EDI, w_NK, xs_PD, h_PF, ys_NKD)
        ctx.plan, ctx.counts = plan, counts
        return y_ND

    @staticmethod
    def backward(ctx, gy_ND):  # noqa: ANN001, ANN205
        gate_up_EFD, down_EDI, w_NK, xs_PD, h_PF, ys_NKD = ctx.saved_tensors
        plan, counts = ctx.plan, ctx.counts
        inter = down_EDI.shape[-1]
        N, K = w_NK.shape
        dtype = xs_PD.dtype
        gy_ND = gy_ND.contiguous()
        gw_NK = None
        if ctx.needs_input_grad[3]:  # d w_nk = <gy_n, ys_nk>, one batched GEMV in fp32
            gw_NK = torch.bmm(ys_NKD, gy_ND.float().unsqueeze(-1)).squeeze(-1)
        # d ys (sorted rows) = w · gy[token]
        w_P = w_NK.reshape(-1).index_select(0, plan.order_P).to(dtype)
        gys_PD = gy_ND.index_select(0, plan.tok_P).mul_(w_P.unsqueeze(-1))
        g_PI, u_PI = h_PF[:, :inter], h_PF[:, inter:]
        sig_PI = torch.sigmoid(g_PI)
        silu_PI = g_PI * sig_PI
        d_down = None
        if ctx.needs_input_grad[2]:
            d_down = _gmm(gys_PD.t(), silu_PI * u_PI, plan.offs_E, counts)
        da_PI = _gmm(gys_PD, down_EDI, plan.offs_E, counts)
        del gys_PD
        dh_PF = torch.empty_like(h_PF)
        torch.mul(da_PI, silu_PI, out=dh_PF[:, inter:])  # d up
        dg_PI = dh_PF[:, :inter]  # d gate = da · u · silu'(g), silu'(g) = sig · (1 + g · (1 - sig))
        torch.mul(g_PI, 1 - sig_PI, out=dg_PI)
        dg_PI.add_(1).mul_(sig_PI).mul_(u_PI).mul_(da_PI)
        del da_PI, sig_PI, silu_PI
        d_gate_up = _gmm(dh_PF.t(), xs_PD, plan.offs_E, counts) if ctx.needs_input_grad[1] else None
        dx_ND = None
        if ctx.needs_input_grad[0]:
            dxs_PD = _gmm(dh_PF, gate_up_EFD, plan.offs_E, counts)
            del dh_PF
            dx_NKD = _unpermute(dxs_PD, plan.inv_NK, K)
            dx_ND = dx_NKD.sum(1) if dtype == torch.float32 else dx_NKD.sum(1, dtype=torch.float32).to(dtype)
        return dx_ND, d_gate_up, d_down, gw_NK, None, None


def _autograd_dispatch(x_ND, gate_up_EFD, down_EDI, w_NK, plan: DispatchPlan) -> torch.Tensor:  # noqa: ANN001
    """The plain recipe under autograd (gather, two `_grouped_mm`, fp32 index_add): benchmark baseline."""
    inter = down_EDI.shape[-1]
    w_P = w_NK.reshape(-1).index_select(0, plan.order_P)
    xs_PD = x_ND.index_select(0, plan.tok_P)
    h_PF = torch._grouped_mm(xs_PD, gate_up_EFD.transpose(-2, -1), offs=plan.offs_E)
    ys_PD = torch._grouped_mm(_silu_mul(h_PF, inter), down_EDI.transpose(-2, -1), offs=plan.offs_E)
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
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up_proj, std=self.initializer_range)
        nn.init.normal_(self.down_proj, std=self.initializer_range)

    def forward(
        self,
        x_ND: torch.Tensor,
        topk_ids_NK: torch.Tensor,
        topk_weights_NK: torch.Tensor,
        capacity: int | None = None,
    ) -> tuple[torch.Tensor, int]:
        if self.impl not in IMPLS:
            raise ValueError(f"RoutedExperts.impl={self.impl!r} must be one of {IMPLS}")
        plan = plan_dispatch(topk_ids_NK, self.num_experts, capacity)
        w_NK = topk_weights_NK.float()
        x_ND = x_ND.to(self.gate_up_proj.dtype)
        W1, W2 = self.gate_up_proj, self.down_proj
        if plan.order_P.numel() == 0:  # N = 0, or everything dropped: zeros, graph kept connected
            return x_ND * 0 + ((W1.sum() + W2.sum()) * 0).to(x_ND.dtype) + (w_NK.sum() * 0).to(x_ND.dtype), \
                plan.dropped
        aligned = gmm_supported(x_ND, self.hidden_size, self.intermediate_size)
        impl = self.impl
        if impl == "auto":
            impl = "gmm" if aligned else "loop"
        counts = None if (impl in ("gmm", "autograd") and aligned) else plan.counts_E.tolist()
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x_ND, w_NK, W1, W2))
        if not grad:
            y = _forward_nograd(x_ND, W1, W2, w_NK, plan, counts)
        elif impl == "autograd" and counts is None:
            y = _autograd_dispatch(x_ND, W1, W2, w_NK, plan)
        else:
            y = _RoutedExpertsFn.apply(x_ND, W1, W2, w_NK, plan, counts)
        return y, plan.dropped

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, D={self.hidden_size}, I={self.intermediate_size}, impl={self.impl}"


@torch.no_grad()
def _forward_nograd(x_ND, gate_up_EFD, down_EDI, w_NK, plan: DispatchPlan, counts) -> torch.Tensor:  # noqa: ANN001
    inter = down_EDI.shape[-1]
    xs_PD = x_ND.index_select(0, plan.tok_P)
    if counts is None:
        h_PF = torch._grouped_mm(xs_PD, gate_up_EFD.transpose(-2, -1), offs=plan.offs_E)
        g_PI = h_PF[:, :inter]
        a_PI = F.silu(g_PI, inplace=True).mul_(h_PF[:, inter:])  # in place: no extra [P, I] buffers
        ys_PD = torch._grouped_mm(a_PI, down_EDI.transpose(-2, -1), offs=plan.offs_E)
    else:
        # Segment loop: each expert's working set stays in cache; no [P, 2I] buffer.
        ys_PD = torch.empty_like(xs_PD)
        s = 0
        for e, n in enumerate(counts):
            if n:
                h = torch.mm(xs_PD[s:s + n], gate_up_EFD[e].t())
                a = F.silu(h[:, :inter], inplace=True).mul_(h[:, inter:])
                torch.mm(a, down_EDI[e].t(), out=ys_PD[s:s + n])
            s += n
    del xs_PD
    return _combine(_unpermute(ys_PD, plan.inv_NK, w_NK.shape[1]), w_NK).to(x_ND.dtype)


def reference_moe(
    x_ND: torch.Tensor,
    gate_up_EFD: torch.Tensor,
    down_EDI: torch.Tensor,
    ids_NK: torch.Tensor,
    weights_NK: torch.Tensor,
) -> torch.Tensor:
    """Test oracle: a plain loop over experts and their tokens, no sorting, fp32 accumulation.

    Uses `unbind(0)` (one view per expert) rather than `W[e]`, so its backward is usable in tests.
    """
    inter = down_EDI.shape[-1]
    y_ND = torch.zeros(x_ND.shape, dtype=torch.float32, device=x_ND.device)
    for e, (wgu, wd) in enumerate(zip(gate_up_EFD.unbind(0), down_EDI.unbind(0))):
        tok, slot = torch.nonzero(ids_NK == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x_ND[tok] @ wgu.t()
        out = (F.silu(h[:, :inter]) * h[:, inter:]) @ wd.t()
        y_ND = y_ND.index_add(0, tok, out.float() * weights_NK[tok, slot].float().unsqueeze(-1))
    return y_ND.to(x_ND.dtype)


__all__ = ["DispatchPlan", "IMPLS", "RoutedExperts", "capacity_for", "gmm_supported", "plan_dispatch",
           "reference_moe"]
