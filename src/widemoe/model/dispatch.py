"""Token dispatch for the MoE block: the plan (sort the token-expert pairs by expert, counts, capacity,
padding), moving rows between token order and local-expert order, and the fp32 combine.

The MoE path is route -> dispatch -> grouped expert compute -> combine (model/moe.py, model/experts.py).
A `TokenDispatcher` owns everything that knows where a row came from; the expert compute sees only
``x_sorted`` (rows sorted by local expert, as a `SortedRows`) and ``counts`` (rows per local expert),
plus the per-row routing weights where it folds them in (see `RoutedExperts`). The dispatcher's methods
come in pairs that are each other's adjoint, which is what a hand-written backward needs:

    dispatch(x_ND)        rows to expert order      adjoint: combine_rows(..., w=None)  (dx)
    combine_rows(y, w)    rows back, fp32 weighted   adjoint: dispatch(gy_ND)           (d y_sorted)
    routing_weights(w_NK) w per sorted row           adjoint: weight_grads(gw)          (d w_NK)

`LocalDispatcher` (one device): sort once (stable, so token order is kept inside a segment, following
torchtitan's `GroupedExperts`); ``x_sorted`` is a lazy gather, ``x_ND[tok_P]``, that the expert workers
run chunk by chunk (`SortedRows.take`): materialising [P, D] up front costs one more pass over memory,
and in bf16 the AMX GEMMs are fast enough that such passes decide the speed (experts module docstring).
`combine_rows` scatter-adds a chunk's rows into a worker-private fp32 [N, D] accumulator;
`combine_finish` sums the accumulators.

An all-to-all dispatcher (expert parallelism) implements the same methods: `plan` also exchanges the
counts, `dispatch` sends the rows to the ranks owning their experts and returns the received rows as a
materialised `SortedRows` (``index=None``) with the counts of this rank's experts, `combine_rows` writes
rows into its receive-order buffer and `combine_finish` sends them back and sums per token; the expert
compute is unchanged.

Optional capacity (Switch Transformer / GShard): each expert keeps its first `capacity` pairs in token
order, overflow pairs are dropped (their token gets no contribution from that expert). The MoE block
passes a capacity only in training; dropless is the default.

Shapes: N tokens, D hidden, E experts, K experts per token, P = N·K pairs, R sorted rows (P - dropped +
pads).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple

import torch


class DispatchPlan(NamedTuple):
    order_P: torch.Tensor  # int64 pair index (into the flattened [N*K]) in expert-sorted order; N*K at pads
    tok_P: torch.Tensor  # int64 token of each sorted row (pads: token 0, with weight 0)
    inv_NK: torch.Tensor  # int64 [N*K]: sorted row of each pair; dropped pairs point at row P (zeros)
    counts_E: torch.Tensor  # int64 rows per expert (kept pairs, plus pads when padded)
    offs_E: torch.Tensor  # int32 cumulative segment ends (what _grouped_mm wants)
    dropped: int  # pairs dropped by the capacity limit
    pads: int = 0  # padding rows (see `plan_dispatch`'s ``pad_to``)
    quantum: int = 1  # every segment length is a multiple of this (``pad_to``)
    top_k: int = 1  # K


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
    return DispatchPlan(order_P, tok_P, inv_NK, counts_E, offs_E, dropped, pads, max(1, pad_to), K)


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


def group_ends(counts: Sequence[int], device: torch.device) -> torch.Tensor:
    """int32 cumulative segment ends of `counts`, the ``offs`` of `torch._grouped_mm`."""
    return torch.tensor(counts, device=device).cumsum(0).to(torch.int32)


class SortedRows(NamedTuple):
    """``x_sorted``: rows in local-expert order, ``src[index]``, or ``src`` itself when ``index`` is None.

    The gather is done where the rows are used (`take`, per chunk, on the expert workers), so that the
    local dispatcher never writes a [R, D] copy."""

    src: torch.Tensor  # [N, D] token rows (index given) or [R, D] rows already sorted (index None)
    index: torch.Tensor | None  # [R] int64: the src row of each sorted row

    @property
    def num_rows(self) -> int:
        return self.src.shape[0] if self.index is None else self.index.shape[0]

    def take(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of x_sorted, [r1 - r0, D] (a new tensor when gathered, else a view)."""
        if self.index is None:
            return self.src[r0:r1]
        return self.src.index_select(0, self.index[r0:r1])

    def full(self) -> torch.Tensor:
        """All rows, [R, D] (differentiable: the gather is an ordinary autograd op)."""
        return self.take(0, self.num_rows)


class TokenDispatcher(ABC):
    """Moves rows between token order and the order of this device's experts (see the module docstring)."""

    num_experts: int  # local experts: `dispatch` returns one count per local expert
    # True when the methods run collectives (expert parallelism): every rank must then make every call,
    # also with no rows, so the compute never skips one (widemoe.distributed.dispatcher)
    collective: bool = False

    @abstractmethod
    def plan(self, topk_ids_NK: torch.Tensor, capacity: int | None = None, pad_to: int = 1) -> DispatchPlan:
        """Sort the (token, expert) pairs; capacity drops and padding act on the local experts' rows."""

    @abstractmethod
    def dispatch(self, x_ND: torch.Tensor, plan: DispatchPlan) -> tuple[SortedRows, list[int]]:
        """(x_sorted, rows per local expert); also used for the gradient of the combine (gy rows)."""

    @abstractmethod
    def routing_weights(self, w_NK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Routing weight of each sorted row, fp32 [R] (0 at pads)."""

    @abstractmethod
    def weight_grads(self, gw_R: torch.Tensor, plan: DispatchPlan, shape: torch.Size) -> torch.Tensor:
        """Adjoint of `routing_weights`: per-row gradients back to ``[N, K]`` fp32 (0 for dropped pairs)."""

    @abstractmethod
    def new_accumulator(self, x_ND: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """An uninitialised fp32 buffer that `combine_rows` adds into (zeroed by its user)."""

    @abstractmethod
    def combine_rows(self, acc: torch.Tensor, plan: DispatchPlan, r0: int, r1: int, y_rows: torch.Tensor,
                     w_rows: torch.Tensor | None) -> None:
        """Add rows r0:r1 of y_sorted into `acc`, times their fp32 weights ``w_rows [r1-r0, 1]`` if given
        (fp32 `y_rows` may be overwritten)."""

    @abstractmethod
    def combine_finish(self, accs: list[torch.Tensor], plan: DispatchPlan) -> torch.Tensor:
        """The fp32 ``[N, D]`` result from the accumulators of every worker."""

    @abstractmethod
    def combine(self, y_sorted: torch.Tensor, w_NK: torch.Tensor | None, plan: DispatchPlan,
                keep_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Whole-buffer combine, fp32 ``[N, D]`` = Σ_k w_nk · y_sorted[row of (n, k)] (plain sum without
        weights); ``keep_rows``: also return the token-ordered rows ``[N, K, D]`` fp32 (for dw)."""


class LocalDispatcher(TokenDispatcher):
    """Every expert on this device: sort once, lazy gather, fp32 scatter-add / gather combine."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def plan(self, topk_ids_NK: torch.Tensor, capacity: int | None = None, pad_to: int = 1) -> DispatchPlan:
        return plan_dispatch(topk_ids_NK, self.num_experts, capacity, pad_to)

    def dispatch(self, x_ND: torch.Tensor, plan: DispatchPlan) -> tuple[SortedRows, list[int]]:
        return SortedRows(x_ND, plan.tok_P), plan.counts_E.tolist()

    def routing_weights(self, w_NK: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return sorted_weights(w_NK, plan)

    def weight_grads(self, gw_R: torch.Tensor, plan: DispatchPlan, shape: torch.Size) -> torch.Tensor:
        return unsort_weight_grads(gw_R, plan, shape)

    def new_accumulator(self, x_ND: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        return torch.empty(x_ND.shape, dtype=torch.float32, device=x_ND.device)

    def combine_rows(self, acc: torch.Tensor, plan: DispatchPlan, r0: int, r1: int, y_rows: torch.Tensor,
                     w_rows: torch.Tensor | None) -> None:
        y = y_rows.float()  # fp32 rows are weighted in place (the caller's temporary)
        acc.index_add_(0, plan.tok_P[r0:r1], y if w_rows is None else y.mul_(w_rows))

    def combine_finish(self, accs: list[torch.Tensor], plan: DispatchPlan) -> torch.Tensor:
        y = accs[0]
        for extra in accs[1:]:
            y += extra
        return y

    def combine(self, y_sorted: torch.Tensor, w_NK: torch.Tensor | None, plan: DispatchPlan,
                keep_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        # a gather back to token order (parallel, cache-friendly), not a scatter-add: `index_add_` over
        # all P rows was 2-5x slower than this on the 2-core CPU; then one fp32 batched GEMV
        if plan.inv_NK.numel() and int(plan.inv_NK.max()) == y_sorted.shape[0]:  # drops: row R is zeros
            y_sorted = torch.cat([y_sorted, y_sorted.new_zeros(1, y_sorted.shape[1])])
        ys_NKD = y_sorted.index_select(0, plan.inv_NK).view(-1, plan.top_k, y_sorted.shape[1])
        if w_NK is None:
            return ys_NKD.sum(1, dtype=torch.float32), None
        if ys_NKD.dtype != torch.float32:
            ys_NKD = ys_NKD.float()
        return torch.bmm(w_NK.unsqueeze(1), ys_NKD).squeeze(1), (ys_NKD if keep_rows else None)


__all__ = ["DispatchPlan", "LocalDispatcher", "SortedRows", "TokenDispatcher", "capacity_for", "group_ends",
           "plan_dispatch", "sorted_weights", "unsort_weight_grads"]
