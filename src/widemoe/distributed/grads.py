"""Gradient-side collectives of a distributed step: the total gradient norm and clipping across meshes,
the one all-reduce of the expert counts per optimizer step, and sums over every rank.

Clipping: `torch.nn.utils.clip_grad_norm_` cannot stack norms of DTensors that live on different meshes
(dense "dp" and expert ("efsdp", "ep"); pytorch#180346). Every gradient element lives on exactly one rank
once FSDP2 has sharded it (replicated placements are divided out), so the global squared norm is one
all-reduce of each rank's local sum of squares. The clip coefficient is the one torch uses,
max_norm / (norm + 1e-6), capped at 1.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn


def _local_square_sum(g: torch.Tensor) -> torch.Tensor:
    """This rank's share of ||g||² in fp64 (a DTensor's local shard, divided by its replication)."""
    if hasattr(g, "to_local"):
        repl = math.prod(g.device_mesh.size(i) for i, p in enumerate(g.placements) if p.is_replicate())
        return g.to_local().double().pow(2).sum() / repl
    return g.double().pow(2).sum() / dist.get_world_size()  # a plain tensor: the same on every rank


@torch.no_grad()
def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """The global L2 norm of the gradients (over every rank); scale them to `max_norm` when above it
    (`max_norm` <= 0: measure only). Every rank returns the same norm."""
    grads = [p.grad for p in params if p.grad is not None]
    dev = grads[0].device if grads else torch.device("cpu")  # NCCL reduces CUDA tensors only
    sq = torch.zeros((), dtype=torch.float64, device=dev)
    for g in grads:
        sq += _local_square_sum(g)
    dist.all_reduce(sq)
    norm = float(sq.sqrt())
    if max_norm > 0 and math.isfinite(norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for g in grads:
                (g.to_local() if hasattr(g, "to_local") else g).mul_(coef)
    return norm


@torch.no_grad()
def all_reduce_expert_counts(model: nn.Module) -> None:
    """Sum every MoE block's `tokens_per_expert` over all ranks in one all-reduce (stacked), so the bias
    update and MaxVio see the global counts and every rank applies the same bias."""
    blocks = model.moe_blocks()
    if not blocks:
        return
    stacked = torch.stack([m.tokens_per_expert for m in blocks])
    dist.all_reduce(stacked)
    for m, c in zip(blocks, stacked, strict=True):
        m.tokens_per_expert.copy_(c)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over every rank (a new fp64 tensor on their device)."""
    t = values.detach().double().clone()
    dist.all_reduce(t)
    return t


__all__ = ["all_reduce_expert_counts", "all_reduce_sum", "clip_grad_norm"]
