"""Expert parallelism behind the dispatch seam: `AllToAllDispatcher` sends each token-expert row to the
rank that holds its expert and brings the expert outputs back (torchtitan's `AllToAllTokenDispatcher`,
Megatron-Core's all-to-all dispatcher), implementing `widemoe.model.dispatch.TokenDispatcher`, so the
grouped expert compute of `widemoe.model.experts` runs unchanged on the local slice of experts.

One MoE layer on rank r of an EP group of size EP, E experts, El = E / EP per rank:

1. plan: sort this rank's (token, expert) pairs by global expert (`plan_dispatch`); since rank j holds
   experts [j·El, (j+1)·El), the sorted rows are already grouped by destination rank. One all-to-all of
   the [EP, El] counts tells every rank how many rows it receives per source rank and local expert.
2. dispatch: gather the rows ``x[tok]`` and all-to-all them with uneven splits. Rows arrive source-major
   (all of rank 0's rows for my experts, then rank 1's, ...); ``SortedRows(received, perm)`` presents
   them expert-major without a copy, as the compute wants.
3. routing weights: the fp32 weights travel with their rows (one float per row) and are applied in fp32
   where the single-process path applies them (folded into fp32 activations, or on the fp32 output rows);
   their gradients travel back.
4. combine: the weighted output rows go back by the reverse all-to-all (in the activations' dtype) and are
   summed per token in fp32 on the source rank. The whole-buffer `combine` (GPU path) sends the unweighted
   rows back and weights them on the source rank in fp32, as the local combine does.

Collectives: every rank runs the same ones in the same order (plan, dispatch, weights in the forward; rows,
weights, combine in the backward), also when it sends or receives no rows, when experts get none, and in
the MTP layers: the autograd Functions of `widemoe.model.experts` call the dispatcher in the same order on
every rank, and `TokenDispatcher.collective` tells the compute not to skip an empty call. Uneven splits
use `all_to_all_single` (the list forms fail on gloo with uneven sizes).

EP = 1 needs no exchange: `parallelize` keeps the `LocalDispatcher` there, bit-identical to one process.
Capacity (optional, training only) applies per source rank: each rank keeps the first
ceil(cf · N_local · K / E) pairs per expert of its own tokens. Segment padding for oneDNN (CPU bf16) is not
applied to exchanged rows.

`CommStats` adds up the bytes each rank sends to other ranks and the seconds spent in the exchanges
(metrics and benchmarks/distributed.py).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from widemoe.model.dispatch import (
    DispatchPlan,
    LocalDispatcher,
    SortedRows,
    TokenDispatcher,
    plan_dispatch,
    sorted_weights,
    unsort_weight_grads,
)


@dataclass
class CommStats:
    """All-to-all traffic of one rank since the last `reset`: bytes sent to other ranks, seconds."""

    bytes_sent: int = 0
    seconds: float = 0.0
    calls: int = 0

    def reset(self) -> None:
        self.bytes_sent, self.seconds, self.calls = 0, 0.0, 0


@dataclass
class EpPlan:
    """The exchange of one MoE call: the source-side sort, the splits, and the expert-major order."""

    local: DispatchPlan  # this rank's pairs sorted by global expert (rows grouped by destination rank)
    send_splits: list[int]  # rows to each EP rank
    recv_splits: list[int]  # rows from each EP rank
    counts: list[int]  # received rows per local expert
    perm_R: torch.Tensor  # expert-major row -> index in the received (source-major) buffer
    num_tokens: int
    row_dtype: torch.dtype | None = None  # the dtype the rows travelled in (set by `dispatch`)
    dropped: int = 0
    quantum: int = 1  # no padding of exchanged rows
    top_k: int = 1

    @property
    def num_rows(self) -> int:
        return int(self.perm_R.numel())


@dataclass
class AllToAllDispatcher(TokenDispatcher):
    """Expert parallelism over `group` (an EP group of `ep_size` ranks; this rank is `ep_rank` in it)."""

    num_global_experts: int
    group: dist.ProcessGroup
    ep_rank: int
    ep_size: int
    stats: CommStats = field(default_factory=CommStats)
    collective = True

    def __post_init__(self) -> None:
        if self.num_global_experts % self.ep_size:
            raise ValueError(
                f"n_routed_experts={self.num_global_experts} must be a multiple of EP={self.ep_size}")
        self.num_experts = self.num_global_experts // self.ep_size  # local experts
        self._source = LocalDispatcher(self.num_global_experts)  # the source-side combine of returned rows

    # --- the exchange ------------------------------------------------------------------------------
    def _exchange(self, rows: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        """Rows split by `send` to the EP ranks, received split by `recv` (dim 0)."""
        out = rows.new_empty((sum(recv), *rows.shape[1:]))
        t0 = time.perf_counter()
        dist.all_to_all_single(out, rows.contiguous(), output_split_sizes=recv, input_split_sizes=send,
                               group=self.group)
        self.stats.seconds += time.perf_counter() - t0
        per_row = rows.element_size() * math.prod(rows.shape[1:])
        self.stats.bytes_sent += (sum(send) - send[self.ep_rank]) * per_row
        self.stats.calls += 1
        return out

    def plan(self, topk_ids_NK: torch.Tensor, capacity: int | None = None, pad_to: int = 1) -> EpPlan:
        local = plan_dispatch(topk_ids_NK, self.num_global_experts, capacity, pad_to=1)
        El, EP = self.num_experts, self.ep_size
        send_EE = local.counts_E.view(EP, El)
        recv_EE = torch.empty_like(send_EE)
        t0 = time.perf_counter()
        dist.all_to_all_single(recv_EE.view(-1), send_EE.reshape(-1), group=self.group)
        self.stats.seconds += time.perf_counter() - t0
        # received rows come source-major (s, e); the compute wants expert-major (e, s)
        seg = torch.repeat_interleave(torch.arange(EP * El, device=recv_EE.device), recv_EE.reshape(-1))
        perm_R = ((seg % El) * EP + seg // El).argsort(stable=True)
        return EpPlan(local, send_EE.sum(1).tolist(), recv_EE.sum(1).tolist(), recv_EE.sum(0).tolist(),
                      perm_R, topk_ids_NK.shape[0], dropped=local.dropped, top_k=local.top_k)

    def dispatch(self, x_ND: torch.Tensor, plan: EpPlan) -> tuple[SortedRows, list[int]]:  # type: ignore[override]
        plan.row_dtype = x_ND.dtype
        rows = self._exchange(x_ND.index_select(0, plan.local.tok_P), plan.send_splits, plan.recv_splits)
        return SortedRows(rows, plan.perm_R), list(plan.counts)

    # --- routing weights -----------------------------------------------------------------------------
    def routing_weights(self, w_NK: torch.Tensor, plan: EpPlan) -> torch.Tensor:  # type: ignore[override]
        w_recv = self._exchange(sorted_weights(w_NK.float(), plan.local), plan.send_splits, plan.recv_splits)
        return w_recv.index_select(0, plan.perm_R)

    def weight_grads(self, gw_R: torch.Tensor, plan: EpPlan, shape: torch.Size) -> torch.Tensor:  # type: ignore[override]
        back = self._exchange(self._to_receive_order(gw_R.float(), plan), plan.recv_splits, plan.send_splits)
        return unsort_weight_grads(back, plan.local, shape)

    # --- combine -------------------------------------------------------------------------------------
    def new_accumulator(self, x_ND: torch.Tensor, plan: EpPlan) -> torch.Tensor:  # type: ignore[override]
        return torch.empty((plan.num_rows, x_ND.shape[1]), dtype=torch.float32, device=x_ND.device)

    def combine_rows(self, acc: torch.Tensor, plan: EpPlan, r0: int, r1: int,  # type: ignore[override]
                     y_rows: torch.Tensor, w_rows: torch.Tensor | None) -> None:
        y = y_rows.float()
        acc.index_copy_(0, plan.perm_R[r0:r1], y if w_rows is None else y.mul_(w_rows))

    def combine_finish(self, accs: list[torch.Tensor], plan: EpPlan) -> torch.Tensor:  # type: ignore[override]
        rows = accs[0]
        for extra in accs[1:]:  # each row was written by one worker; the others hold zeros there
            rows = rows + extra
        dtype = plan.row_dtype or rows.dtype
        back = self._exchange(rows.to(dtype), plan.recv_splits, plan.send_splits)
        out = torch.zeros((plan.num_tokens, rows.shape[1]), dtype=torch.float32, device=rows.device)
        return out.index_add_(0, plan.local.tok_P, back.float())

    def combine(self, y_sorted: torch.Tensor, w_NK: torch.Tensor | None, plan: EpPlan,  # type: ignore[override]
                keep_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        back = self._exchange(self._to_receive_order(y_sorted, plan), plan.recv_splits, plan.send_splits)
        return self._source.combine(back, w_NK, plan.local, keep_rows)

    @staticmethod
    def _to_receive_order(rows_R: torch.Tensor, plan: EpPlan) -> torch.Tensor:
        out = torch.empty_like(rows_R)
        return out.index_copy_(0, plan.perm_R, rows_R)


__all__ = ["AllToAllDispatcher", "CommStats", "EpPlan"]
