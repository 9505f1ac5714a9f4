"""The process group of a `torchrun` launch: read torchrun's environment, pick the backend, clean up.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process it starts. The
backend is NCCL when CUDA is available, else gloo (the CPU path, tested on 2 and 4 ranks); the
``WIDEMOE_DIST_BACKEND`` environment variable or the ``backend`` argument overrides the choice. One
process without torchrun's variables is a world of one: no process group, nothing to tear down.

`shutdown` puts a barrier before `destroy_process_group`: without it a rank that finishes first can tear
the group down under a peer still in its last collective (seen on 4-rank gloo runs, shared/reference/
distributed.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")
# A peer that dies makes the others wait in a collective; this bounds the wait (then an error, no hang).
DEFAULT_TIMEOUT_S = 300


class DistributedError(RuntimeError):
    """A launch that cannot form its process group as asked (the message names the variable or rule)."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, local rank, its device and the backend (None: one
    process, no process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, writes metrics and exports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str) -> int:
    text = os.environ.get(name, "")
    try:
        value = int(text)
    except ValueError:
        raise DistributedError(f"{name}={text!r} (set by torchrun) is not an integer") from None
    if value < 0:
        raise DistributedError(f"{name}={value} (set by torchrun) must be >= 0")
    return value


def choose_backend(backend: str | None = None) -> str:
    """`backend`, else WIDEMOE_DIST_BACKEND, else nccl with CUDA and gloo without."""
    default = "nccl" if torch.cuda.is_available() else "gloo"
    chosen = backend or os.environ.get("WIDEMOE_DIST_BACKEND") or default
    if chosen not in BACKENDS:
        raise DistributedError(f"backend {chosen!r} (WIDEMOE_DIST_BACKEND) must be one of {BACKENDS}")
    if chosen == "nccl" and not torch.cuda.is_available():
        raise DistributedError("backend 'nccl' needs CUDA GPUs; this machine has none (use gloo)")
    return chosen


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join torchrun's process group (idempotent); a plain process gets `DistEnv()` (world of one)."""
    if not launched_by_torchrun():
        return DistEnv()
    rank, world, local = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if rank >= world:
        raise DistributedError(f"RANK={rank} must be < WORLD_SIZE={world}")
    chosen = choose_backend(backend)
    device = torch.device("cuda", local) if chosen == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(chosen, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return DistEnv(rank, world, local, device, chosen)


def shutdown() -> None:
    """Barrier, then destroy the process group (no-op without one)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


__all__ = ["BACKENDS", "DistEnv", "DistributedError", "choose_backend", "init_distributed",
           "launched_by_torchrun", "shutdown"]
