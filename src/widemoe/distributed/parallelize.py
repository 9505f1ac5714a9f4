"""`parallelize(model, layout)`: expert parallelism and FSDP2 on a built model (torchtitan's
`parallelize_fn`), in place, before the optimizer is built.

- EP > 1: every MoE block gets an `AllToAllDispatcher` over its EP group, and its stacked expert weights
  become DTensors ``Shard(0)`` on the "ep" mesh: rank r keeps experts [(r mod EP)·E/EP, ...), whole
  experts, under the model's own parameter names, so a DCP checkpoint knows where every expert lives and
  reshards to any layout (no renumbering of local experts: torchtitan#732).
- FSDP2 (`fully_shard`): the experts on the "efsdp" mesh (the ranks that hold the same experts; the dense
  mesh when EP = 1), then every decoder layer and every MTP depth's decoder block, then the root (which
  keeps the embedding, the head, the final norm and the MTP projections and norms: the MTP head norm is
  called outside its module's forward, so the MTP module itself is not a unit of its own; shared/reference/
  distributed.md).
- Gradients are summed, not averaged, by every FSDP unit (`set_gradient_divide_factor(1.0)`; gloo also
  needs `set_force_sum_reduction_for_comms`, it has no PREMUL_SUM): the loss each rank backpropagates is
  its token-loss sum over the global token count (`widemoe.train.step`), so summing over ranks gives the
  gradient of the global mean for dense and expert weights alike. Averaging would leave expert gradients
  EP times too large: the all-to-all already sums their contributions over the EP group, and FSDP would
  divide only by the efsdp size (the classic bug, shared/reference/distributed.md).
- Parameters stay fp32 and gradients are reduced in fp32; bf16 runs under autocast as on one process, the
  router computing in fp32 and the balancing bias an fp32 buffer outside autocast.

A world of one process is left as it is (no FSDP, the local dispatcher): bit-identical to `widemoe train`
without torchrun.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from widemoe.distributed.dims import ParallelDims
from widemoe.distributed.dispatcher import AllToAllDispatcher, CommStats


@dataclass
class Layout:
    """The parallel layout of one run: dims and the meshes built from them (None in a world of one)."""

    dims: ParallelDims
    dense_mesh: Any = None  # ("dp",) over every rank
    expert_mesh: Any = None  # ("efsdp", "ep")

    @classmethod
    def build(cls, dims: ParallelDims, device_type: str) -> Layout:
        if dims.world_size == 1:
            return cls(dims)
        dense, experts = dims.build_meshes(device_type)
        return cls(dims, dense, experts)


def _sum_gradients(module: nn.Module) -> None:
    module.set_gradient_divide_factor(1.0)
    module.set_force_sum_reduction_for_comms(True)


def shard_experts(model: nn.Module, layout: Layout) -> None:
    """EP: the all-to-all dispatcher and ``Shard(0)`` expert weights on the "ep" mesh (EP > 1 only)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    ep_mesh = layout.expert_mesh["ep"]
    group, ep_rank, E = ep_mesh.get_group(), ep_mesh.get_local_rank(), model.config.n_routed_experts
    layout.dims.check_experts(E)
    for moe in model.moe_blocks():
        moe.dispatcher = AllToAllDispatcher(E, group, ep_rank, layout.dims.ep)
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(moe.experts, name)
            # every rank built the same weights from the run's seed: each keeps its own experts' rows,
            # no communication (src_data_rank=None)
            dt = distribute_tensor(full.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
            setattr(moe.experts, name, nn.Parameter(dt, requires_grad=full.requires_grad))


def parallelize(model: nn.Module, layout: Layout | None) -> nn.Module:
    """Apply `layout` to `model` in place and return it (see the module docstring)."""
    if layout is None or layout.dims.world_size == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    if layout.dims.ep > 1:
        shard_experts(model, layout)
    expert_fsdp = layout.expert_mesh["efsdp"] if layout.dims.ep > 1 else layout.dense_mesh
    for moe in model.moe_blocks():
        _sum_gradients(fully_shard(moe.experts, mesh=expert_fsdp))
    body = model.model
    units = list(body.layers) + [m.block for m in getattr(body, "mtp", [])]
    for unit in units:
        _sum_gradients(fully_shard(unit, mesh=layout.dense_mesh))
    _sum_gradients(fully_shard(model, mesh=layout.dense_mesh))
    return model


def comm_stats(model: nn.Module) -> CommStats:
    """The all-to-all traffic of every MoE block since the last `reset_comm_stats`, added up."""
    total = CommStats()
    for moe in model.moe_blocks():
        s = getattr(moe.dispatcher, "stats", None)
        if s is not None:
            total.bytes_sent += s.bytes_sent
            total.seconds += s.seconds
            total.calls += s.calls
    return total


def reset_comm_stats(model: nn.Module) -> None:
    for moe in model.moe_blocks():
        s = getattr(moe.dispatcher, "stats", None)
        if s is not None:
            s.reset()


__all__ = ["Layout", "comm_stats", "parallelize", "reset_comm_stats", "shard_experts"]
