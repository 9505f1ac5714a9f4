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
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from widemoe.config import ModelConfig

IMPLS = ("auto", "gmm", "loop", "threads", "autograd")


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


# --------------------------------------------------------------------------------------------------
# Expert-parallel segment execution (CPU). Many small per-expert GEMMs each open an OpenMP parallel
# region; on a busy 2-core machine every region waits for a descheduled partner thread, and 2-thread
# small GEMMs fell to 5-6 GFLOP/s while 1-thread ones ran at 20-30 (measured side by side). Splitting the
# experts between single-threaded workers has no per-GEMM barrier and keeps each expert's working set in
# its core's cache; the big elementwise / gather ops stay on the intra-op pool.

_POOL: dict[str, object] = {}


def _worker_init() -> None:
    torch.set_num_threads(1)  # OpenMP/MKL thread counts are per-thread settings: the caller keeps its own


def _expert_pool(workers: int) -> ThreadPoolExecutor:
    pool = _POOL.get("pool")
    if pool is None or _POOL.get("size") != workers or _POOL.get("pid") != os.getpid():  # fork-safe
        pool = ThreadPoolExecutor(workers, thread_name_prefix="widemoe-experts", initializer=_worker_init)
        _POOL.update(pool=pool, size=workers, pid=os.getpid())
    return pool  # type: ignore[return-value]


def _run_segments(fn: Callable[[int, int, int], None], counts: list[int], workers: int) -> None:
    """Call fn(e, start_row, n_rows) for every non-empty expert, split over `workers` threads by load."""
    jobs, s = [], 0
    for e, n in enumerate(counts):
        if n:
            jobs.append((e, s, n))
        s += n
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            fn(*job)
        return
    total, chunks, cur, acc = sum(counts), [], [], 0
    for job in jobs:  # contiguous chunks of ~equal row counts
        cur.append(job)
        acc += job[2]
        if acc >= total * (len(chunks) + 1) / workers and len(chunks) < workers - 1:
            chunks.append(cur)
            cur = []
    chunks.append(cur)
    inference = torch.is_inference_mode_enabled()

    def run(chunk: list[tuple[int, int, int]]) -> None:
        # grad mode is thread-local: without this, W[e] on a parameter would record autograd in the worker
        with torch.inference_mode() if inference else torch.no_grad():
            for job in chunk:
                fn(*job)

    futures = [_expert_pool(workers).submit(run, c) for c in chunks if c]
    for f in futures:
        f.result()


class _Experts:
    """The expert math on sorted rows, by one of three backends: `_grouped_mm` over whole buffers, or
    per-expert segments run serially ("loop") or across worker threads ("threads")."""

    def __init__(self, gate_up_EFD: torch.Tensor, down_EDI: torch.Tensor, plan: DispatchPlan, backend: str):
        self.W1, self.W2, self.plan, self.backend = gate_up_EFD, down_EDI, plan, backend
        self.inter = down_EDI.shape[-1]
        self.counts = None if backend == "gmm" else plan.counts_E.tolist()
        self.workers = torch.get_num_threads() if backend == "threads" else 1

    def forward(self, xs_PD: torch.Tensor, save: bool) -> tuple[torch.Tensor, ...]:
        """ys = SwiGLU_e(xs) per segment; with `save`, also the pre-activations h [P, 2I] and a [P, I]."""
        I, W1, W2 = self.inter, self.W1, self.W2
        if self.counts is None:
            offs = self.plan.offs_E
            h_PF = torch._grouped_mm(xs_PD, W1.transpose(-2, -1), offs=offs)
            if save:
                a_PI = F.silu(h_PF[:, :I]) * h_PF[:, I:]
            else:  # in place: no extra [P, I] buffers
                a_PI = F.silu(h_PF[:, :I], inplace=True).mul_(h_PF[:, I:])
            ys_PD = torch._grouped_mm(a_PI, W2.transpose(-2, -1), offs=offs)
            return ys_PD, (h_PF if save else None), (a_PI if save else None)
        P = xs_PD.shape[0]
        ys_PD = xs_PD.new_empty(P, W2.shape[1])
        h_PF = xs_PD.new_empty(P, 2 * I) if save else None
        a_PI = xs_PD.new_empty(P, I) if save else None

        def seg(e: int, s: int, n: int) -> None:
            if save:
                h = torch.mm(xs_PD[s:s + n], W1[e].t(), out=h_PF[s:s + n])
                a = torch.mul(F.silu(h[:, :I]), h[:, I:], out=a_PI[s:s + n])
            else:
                h = torch.mm(xs_PD[s:s + n], W1[e].t())
                a = F.silu(h[:, :I], inplace=True).mul_(h[:, I:])
            torch.mm(a, W2[e].t(), out=ys_PD[s:s + n])

        _run_segments(seg, self.counts, self.workers)
        return ys_PD, h_PF, a_PI

    def backward(self, gys_PD: torch.Tensor, xs_PD: torch.Tensor, h_PF: torch.Tensor, a_PI: torch.Tensor,
                 need: tuple[bool, bool, bool]) -> tuple[torch.Tensor | None, ...]:
        """Given d ys (already weighted), return (d xs [P, D], d gate_up [E, 2I, D], d down [E, D, I])."""
        I, W1, W2 = self.inter, self.W1, self.W2
        need_x, need_w1, need_w2 = need
        if self.counts is None:
            offs = self.plan.offs_E
            d_down = torch._grouped_mm(gys_PD.t(), a_PI, offs=offs) if need_w2 else None
            da_PI = torch._grouped_mm(gys_PD, W2, offs=offs)
            dh_PF = torch.empty_like(h_PF)
            _swiglu_backward(da_PI, h_PF, dh_PF, I)
            del da_PI
            d_gate_up = torch._grouped_mm(dh_PF.t(), xs_PD, offs=offs) if need_w1 else None
            dxs_PD = torch._grouped_mm(dh_PF, W1, offs=offs) if need_x else None
            return dxs_PD, d_gate_up, d_down
        d_down = torch.empty_like(W2) if need_w2 else None
        d_gate_up = torch.empty_like(W1) if need_w1 else None
        dxs_PD = torch.empty_like(xs_PD) if need_x else None
        for e, n in enumerate(self.counts):  # experts without tokens: exactly-zero weight gradients
            if n == 0:
                for g in (d_down, d_gate_up):
                    if g is not None:
                        g[e].zero_()

        def seg(e: int, s: int, n: int) -> None:
            gys = gys_PD[s:s + n]
            if need_w2:
                torch.mm(gys.t(), a_PI[s:s + n], out=d_down[e])
            da = torch.mm(gys, W2[e])
            dh = torch.empty_like(h_PF[s:s + n])
            _swiglu_backward(da, h_PF[s:s + n], dh, I)
            if need_w1:
                torch.mm(dh.t(), xs_PD[s:s + n], out=d_gate_up[e])
            if need_x:
                torch.mm(dh, W1[e], out=dxs_PD[s:s + n])

        _run_segments(seg, self.counts, self.workers)
        return dxs_PD, d_gate_up, d_down


def _swiglu_backward(da_PI: torch.Tensor, h_PF: torch.Tensor, dh_PF: torch.Tensor, I: int) -> None:
    """dh = d[silu(g) * u]: d up = da · silu(g); d gate = silu'(g) · da · u (ATen's fused silu_backward,
    few passes matter in bf16). Overwrites da."""
    g, u = h_PF[:, :I], h_PF[:, I:]
    torch.mul(da_PI, F.silu(g), out=dh_PF[:, I:])
    torch.ops.aten.silu_backward.grad_input(da_PI.mul_(u), g, grad_input=dh_PF[:, :I])


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


class _RoutedExpertsFn(torch.autograd.Function):
    """y = Σ_k w_k · SwiGLU_{e_k}(x): one gather, grouped expert compute, one fp32 combine; own backward.

    Saved once: the gathered rows [P, D], the pre-activations [P, 2I] and activations [P, I], and the
    token-ordered expert outputs (fp32, for the routing-weight gradient). The backward writes dW straight
    into [E, ...] gradients and never builds autograd's copies for chunk / silu / mul / index_add.
    """

    @staticmethod
    def forward(ctx, x_ND, gate_up_EFD, down_EDI, w_NK, plan: DispatchPlan, backend: str):  # noqa: ANN001, ANN205
        ex = _Experts(gate_up_EFD, down_EDI, plan, backend)
        xs_PD = x_ND.index_select(0, plan.tok_P)
        ys_PD, h_PF, a_PI = ex.forward(xs_PD, save=True)
        ys_NKD = _unpermute(ys_PD, plan.inv_NK, w_NK.shape[1])
        del ys_PD
        if ys_NKD.dtype != torch.float32:
            ys_NKD = ys_NKD.float()
        y_ND = _combine(ys_NKD, w_NK).to(x_ND.dtype)
        ctx.save_for_backward(gate_up_EFD, down_EDI, w_NK, xs_PD, h_PF, a_PI, ys_NKD)
        ctx.plan, ctx.backend = plan, backend
        return y_ND

    @staticmethod
    def backward(ctx, gy_ND):  # noqa: ANN001, ANN205
        gate_up_EFD, down_EDI, w_NK, xs_PD, h_PF, a_PI, ys_NKD = ctx.saved_tensors
        plan = ctx.plan
        K = w_NK.shape[1]
        dtype = xs_PD.dtype
        gy_ND = gy_ND.contiguous()
        gw_NK = None
        if ctx.needs_input_grad[3]:  # d w_nk = <gy_n, ys_nk>: one batched GEMV in fp32
            gw_NK = torch.bmm(ys_NKD, gy_ND.float().unsqueeze(-1)).squeeze(-1)
        del ys_NKD
        w_P = w_NK.reshape(-1).index_select(0, plan.order_P).to(dtype)
        gys_PD = gy_ND.index_select(0, plan.tok_P).mul_(w_P.unsqueeze(-1))  # d ys = w · gy[token]
        ex = _Experts(gate_up_EFD, down_EDI, plan, ctx.backend)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        dxs_PD, d_gate_up, d_down = ex.backward(gys_PD, xs_PD, h_PF, a_PI, need)
        dx_ND = None
        if dxs_PD is not None:
            dx_NKD = _unpermute(dxs_PD, plan.inv_NK, K)
            dx_ND = dx_NKD.sum(1) if dtype == torch.float32 else dx_NKD.sum(1, dtype=torch.float32).to(dtype)
        return dx_ND, d_gate_up, d_down, gw_NK, None, None


def _autograd_dispatch(x_ND, gate_up_EFD, down_EDI, w_NK, plan: DispatchPlan) -> torch.Tensor:  # noqa: ANN001
    """The plain recipe under autograd (gather, two `_grouped_mm`, fp32 index_add): benchmark baseline."""
    inter = down_EDI.shape[-1]
    w_P = w_NK.reshape(-1).index_select(0, plan.order_P)
    xs_PD = x_ND.index_select(0, plan.tok_P)
    h_PF = torch._grouped_mm(xs_PD, gate_up_EFD.transpose(-2, -1), offs=plan.offs_E)
    ys_PD = torch._grouped_mm(F.silu(h_PF[:, :inter]) * h_PF[:, inter:], down_EDI.transpose(-2, -1),
                              offs=plan.offs_E)
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
        plan = plan_dispatch(topk_ids_NK, self.num_experts, capacity)
        w_NK = topk_weights_NK.float()
        x_ND = x_ND.to(self.gate_up_proj.dtype)
        W1, W2 = self.gate_up_proj, self.down_proj
        if plan.order_P.numel() == 0:  # N = 0, or everything dropped: zeros, graph kept connected
            zero = ((W1.sum() + W2.sum()) * 0).to(x_ND.dtype) + (w_NK.sum() * 0).to(x_ND.dtype)
            return x_ND * 0 + zero, plan.dropped
        backend = self.backend_for(x_ND)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x_ND, w_NK, W1, W2))
        if not grad:
            y = _forward_nograd(x_ND, W1, W2, w_NK, plan, "gmm" if backend == "autograd" else backend)
        elif backend == "autograd":
            y = _autograd_dispatch(x_ND, W1, W2, w_NK, plan)
        else:
            y = _RoutedExpertsFn.apply(x_ND, W1, W2, w_NK, plan, backend)
        return y, plan.dropped

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, D={self.hidden_size}, I={self.intermediate_size}, impl={self.impl}"


@torch.no_grad()
def _forward_nograd(x_ND, gate_up_EFD, down_EDI, w_NK, plan: DispatchPlan, backend: str) -> torch.Tensor:  # noqa: ANN001
    xs_PD = x_ND.index_select(0, plan.tok_P)
    ys_PD, _, _ = _Experts(gate_up_EFD, down_EDI, plan, backend).forward(xs_PD, save=False)
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
