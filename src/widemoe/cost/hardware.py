"""The GPU catalogue and what follows from it: peak FLOP rates, GPU-hours at an MFU, the MFU a
reported GPU-hour figure implies, and the GPUs a served model needs.

Peaks are dense (no 2:4 sparsity) per-GPU datasheet figures; memory is usable HBM in decimal GB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from widemoe.config import ModelConfig
from widemoe.cost.counts import training_flops
from widemoe.cost.memory import kv_bytes, weight_bytes
from widemoe.cost.units import CostError


@dataclass(frozen=True)
class Gpu:
    name: str
    bf16_tflops: float  # dense, no 2:4 sparsity
    fp8_tflops: float
    memory_gb: float  # usable HBM, decimal GB
    source: str


GPUS: dict[str, Gpu] = {g.name.lower(): g for g in (
    Gpu("H800", 989.4, 1978.9, 80, "H100 SXM compute (same GH100 die; only NVLink/FP64 are cut)"),
    Gpu("H100", 989.4, 1978.9, 80, "NVIDIA H100 SXM datasheet; dense = half the sparse figure"),
    Gpu("H200", 989.4, 1978.9, 141, "NVIDIA H200 SXM: H100 compute, 141 GB HBM3e"),
    Gpu("B200", 2250.0, 4500.0, 180, "NVIDIA HGX B200 per-GPU spec (1000 W), 180 GB HBM3e"),
)}


def get_gpu(name: str) -> Gpu:
    g = GPUS.get(name.lower())
    if g is None:
        raise CostError(f"unknown gpu {name!r}; choose one of {', '.join(x.name for x in GPUS.values())}")
    return g


def peak_flops(gpu: Gpu, precision: str) -> float:
    if precision not in ("bf16", "fp8"):
        raise CostError(f"precision={precision!r} must be bf16 or fp8")
    return 1e12 * (gpu.bf16_tflops if precision == "bf16" else gpu.fp8_tflops)


def gpu_hours(c: ModelConfig, tokens: float, seq_len: int, gpu: Gpu, mfu: float,
              precision: str = "bf16") -> float:
    if not 0 < mfu <= 1:
        raise CostError(f"mfu={mfu} must be in (0, 1]")
    return training_flops(c, tokens, seq_len) / (peak_flops(gpu, precision) * mfu) / 3600


def implied_mfu(c: ModelConfig, tokens: float, seq_len: int, gpu: Gpu, hours: float,
                precision: str = "bf16") -> float:
    """The MFU a reported GPU-hour figure implies (model FLOPs / (GPU-seconds x peak))."""
    if hours <= 0:
        raise CostError(f"gpu_hours={hours} must be > 0")
    return training_flops(c, tokens, seq_len) / (hours * 3600 * peak_flops(gpu, precision))


SERVING_MEMORY_SHARE = 0.9  # leave 10% of HBM for activations, CUDA context and fragmentation


def serving_gpus(c: ModelConfig, gpu: Gpu, context: int, batch: int = 1, weight_dtype: str = "bf16",
                 kv_dtype: str = "bf16") -> int:
    """Fewest GPUs whose memory holds the weights plus the KV cache of `batch` x `context`."""
    need = weight_bytes(c, weight_dtype) + kv_bytes(c, context, batch, kv_dtype)
    return max(1, math.ceil(need / (gpu.memory_gb * 1e9 * SERVING_MEMORY_SHARE)))


__all__ = ["GPUS", "SERVING_MEMORY_SHARE", "Gpu", "get_gpu", "gpu_hours", "implied_mfu", "peak_flops",
           "serving_gpus"]
