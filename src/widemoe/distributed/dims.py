"""The parallel layout: world size W and expert-parallel degree EP, checked, and the device meshes built
from them (torchtitan's `ParallelDims`, reduced to what widemoe runs: data parallel with FSDP2, expert
parallel inside it).

    dense mesh   ("dp",)          [W]             FSDP2 over every rank: attention, norms, router,
                                                  shared experts, embedding, head, MTP
    expert mesh  ("efsdp", "ep")  [W / EP, EP]    experts Shard(0) over "ep" (E / EP whole experts per
                                                  rank), FSDP2 over "efsdp" (the ranks holding the same
                                                  experts)

"ep" is the inner (faster varying) dimension: ranks r and r+1 are in one EP group, so on a multi-GPU
node the all-to-all stays between neighbouring devices. Ranks ``[g·EP, (g+1)·EP)`` form EP group g; rank
r holds experts ``[(r mod EP)·E/EP, (r mod EP + 1)·E/EP)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class LayoutError(ValueError):
    """A world size / EP degree / expert count that does not divide (the message names the rule): a usage
    error (exit status 2), like a bad flag value."""

    exit_status = 2


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    ep: int = 1

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise LayoutError(f"world size {self.world_size} must be >= 1")
        if self.ep < 1:
            raise LayoutError(f"--ep {self.ep} must be >= 1")
        if self.world_size == 1 and self.ep > 1:
            raise LayoutError(f"--ep {self.ep} needs several processes and this is one: launch with "
                              f"torchrun --nproc-per-node N -m widemoe train ... (N a multiple of {self.ep})")
        if self.world_size % self.ep:
            raise LayoutError(f"--ep {self.ep} must divide the world size {self.world_size} (W % EP == 0)")

    @property
    def efsdp(self) -> int:
        """Ranks that hold the same experts (FSDP2 shards each expert's weights over them)."""
        return self.world_size // self.ep

    def check_experts(self, num_experts: int, where: str = "the model") -> None:
        """Every EP rank holds the same number of whole experts: E % EP == 0."""
        if num_experts % self.ep:
            raise LayoutError(f"--ep {self.ep} must divide n_routed_experts={num_experts} of {where} "
                              f"(E % EP == 0); choose EP from {divisors(num_experts, self.world_size)}")

    def check_batch(self, batch_size: int) -> None:
        """The global batch is split evenly: batch_size % W == 0."""
        if batch_size % self.world_size:
            raise LayoutError(f"--batch-size {batch_size} (the global batch) must be a multiple of the "
                              f"number of processes {self.world_size}")

    def build_meshes(self, device_type: str) -> tuple[Any, Any]:
        """(dense mesh ("dp",), expert mesh ("efsdp", "ep")) over the initialised process group."""
        from torch.distributed.device_mesh import init_device_mesh

        dense = init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("dp",))
        experts = init_device_mesh(device_type, (self.efsdp, self.ep), mesh_dim_names=("efsdp", "ep"))
        return dense, experts


def divisors(n: int, world: int) -> list[int]:
    """The EP degrees that fit both `n` experts and `world` ranks."""
    return [d for d in range(1, world + 1) if n % d == 0 and world % d == 0]


__all__ = ["LayoutError", "ParallelDims", "divisors"]
