"""How a training run spans processes: `RunContext` holds this process's place (`widemoe.distributed`)
and the few things the loop does differently on several ranks. In a world of one every method is the
identity, so single-process training runs exactly the code it ran before.

The data parallelism is over the global batch: every rank reads the same data stream (the same seed and
cursor), takes rows ``[r·B/W, (r+1)·B/W)`` of each global batch (`local_rows`), and the loss each rank
backpropagates is its token-loss mean times n_local / n_global (`loss_scale`), so the summed gradients
(FSDP2 units sum, see `widemoe.distributed.parallelize`) are those of the global mean. `--batch-size`
therefore means the same global batch whatever the number of ranks, and a checkpoint's data cursor fits
any layout. Rank 0 prints, writes metrics.jsonl and holds the run directory's lock; every rank runs the
collectives and writes its part of a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from widemoe.distributed.env import DistEnv
from widemoe.distributed.grads import all_reduce_expert_counts, all_reduce_sum, clip_grad_norm
from widemoe.distributed.parallelize import Layout, comm_stats, reset_comm_stats

T = TypeVar("T")


class RankFailed(RuntimeError):
    """Raised on the other ranks when rank 0 refused the run (the same message as rank 0's error)."""


@dataclass
class RunContext:
    env: DistEnv = field(default_factory=DistEnv)
    layout: Layout | None = None

    @property
    def world(self) -> int:
        return self.env.world_size

    @property
    def distributed(self) -> bool:
        return self.env.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    # --- data -----------------------------------------------------------------------------------
    def local_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch tensor (dim 0)."""
        if not self.distributed:
            return t
        n = t.shape[0] // self.world
        return t[self.env.rank * n:(self.env.rank + 1) * n]

    def loss_scale(self, n_local: int) -> float:
        """n_local / n_global for this micro-batch's valid tokens (1 alone)."""
        if not self.distributed:
            return 1.0
        n_global = int(self.sum(torch.tensor([float(n_local)]))[0])
        return n_local / max(1, n_global)

    # --- reductions -----------------------------------------------------------------------------
    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over ranks (fp64 copy; `t` itself when alone)."""
        if not self.distributed:
            return t
        return all_reduce_sum(t.to(self.env.device)).to(t.device)

    def clip_grad_norm(self, model: torch.nn.Module, max_norm: float) -> float:
        if not self.distributed:
            return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
        return clip_grad_norm(model.parameters(), 0.0 if max_norm == float("inf") else max_norm)

    def reduce_expert_counts(self, model: torch.nn.Module) -> None:
        if self.distributed:
            all_reduce_expert_counts(model)

    def reset_comm(self, model: torch.nn.Module) -> None:
        if self.distributed:
            reset_comm_stats(model)

    def comm(self, model: torch.nn.Module) -> dict[str, float]:
        """All-to-all bytes sent off this rank and seconds since `reset_comm` (mean over ranks)."""
        if not self.distributed:
            return {}
        s = comm_stats(model)
        mean = self.sum(torch.tensor([float(s.bytes_sent), s.seconds])) / self.world
        return {"a2a_bytes_per_rank": float(mean[0]), "a2a_seconds": float(mean[1])}

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def main_first(self, fn: Callable[[], T]) -> T | None:
        """Run `fn` on rank 0, then tell every rank how it went: an exception on rank 0 is re-raised there
        and raised as `RankFailed` (same message) on the others, so every rank stops together."""
        if not self.distributed:
            return fn()
        result: T | None = None
        error: BaseException | None = None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - re-raised below, after the others are told
                error = e
        box: list[Any] = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(box, src=0)
        if error is not None:
            raise error
        if box[0] is not None:
            raise RankFailed(f"rank 0 stopped: {box[0]}")
        return result


__all__ = ["RankFailed", "RunContext"]
