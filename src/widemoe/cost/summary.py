"""One model's figures gathered as a nested dict: the tables of `widemoe cost` and its `--json`
output show the same numbers. `Options` holds the scenario (context, training run, layout, GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from widemoe.config import ModelConfig
from widemoe.cost.counts import count_params, flops_per_token, mtp_redundant_copies, training_flops
from widemoe.cost.families import formulas_for
from widemoe.cost.hardware import GPUS, Gpu, get_gpu, gpu_hours, implied_mfu, serving_gpus
from widemoe.cost.memory import (
    BYTES,
    kv_bytes,
    kv_bytes_per_token,
    kv_elements_per_token_layer,
    kv_uncompressed_elements_per_token_layer,
    training_bytes_per_gpu,
    weight_bytes,
)
from widemoe.cost.published import DenseContrast
from widemoe.cost.units import CostError
from widemoe.presets import get_preset


@dataclass(frozen=True)
class Options:
    context: int = 131072  # KV cache and serving context (positions)
    batch: int = 1
    seq_len: int = 4096  # training sequence length (sets the attention term)
    tokens: float = 14.8e12  # training tokens D
    gpu: str = "H800"
    mfu: float = 0.4
    precision: str = "bf16"  # the peak that the MFU refers to
    gpu_hours: float | None = None  # a reported figure -> the MFU it implies
    dp: int = 8
    ep: int = 1
    pp: int = 1
    zero: int = 3
    weight_dtype: str = "bf16"  # serving weights
    kv_dtype: str = "bf16"


def summary(c: ModelConfig, o: Options | None = None) -> dict[str, Any]:
    """Parameters, FLOPs per token, memory, training cost and serving GPUs of `c` under `o`."""
    o = o or Options()
    if o.context < 0:
        raise CostError(f"context={o.context} must be >= 0")
    if o.batch < 1 or o.seq_len < 1:
        raise CostError(f"batch={o.batch} and seq_len={o.seq_len} must be >= 1")
    gpu = get_gpu(o.gpu)
    return {
        "params": _params(c),
        "flops_per_token": _flops(c, o),
        "memory": _memory(c, o),
        "training": _training(c, o, gpu),
        "serving": {
            "weight_dtype": o.weight_dtype,
            "kv_dtype": o.kv_dtype,
            "context": o.context,
            "batch": o.batch,
            "gpus": {
                g.name: serving_gpus(c, g, o.context, o.batch, o.weight_dtype, o.kv_dtype)
                for g in GPUS.values()
            },
        },
    }


def _params(c: ModelConfig) -> dict[str, Any]:
    p = count_params(c)
    return {
        "total": p.main_total,
        "mtp": p.mtp,
        "total_with_mtp": p.total_with_mtp,
        "mtp_redundant_copies_in_checkpoint": mtp_redundant_copies(c),
        "buffers_fp32": p.buffers,
        "active_with_embedding": p.active_with_embedding,
        "active_without_embedding": p.active_without_embedding,
        "matmul_active": p.matmul_active,
        "breakdown_total": p.total,
        "breakdown_active": p.active,
        "mtp_breakdown": p.mtp_total,
    }


def _flops(c: ModelConfig, o: Options) -> dict[str, Any]:
    f = flops_per_token(c, o.seq_len)
    return {
        "seq_len": o.seq_len,
        "forward_matmul": f.forward_matmul,
        "forward_attention": f.forward_attention,
        "forward": f.forward,
        "train_6n": f.train_matmul,
        "train_attention": f.train_attention,
        "train_mtp": f.train_mtp,
        "train": f.train,
    }


def _memory(c: ModelConfig, o: Options) -> dict[str, Any]:
    contrast = formulas_for(c).kv_contrast_preset
    return {
        "weights": {d: weight_bytes(c, d) for d in BYTES},
        "kv_elements_per_token_layer": kv_elements_per_token_layer(c),
        "kv_uncompressed_elements_per_token_layer": kv_uncompressed_elements_per_token_layer(c),
        "kv_dtype": o.kv_dtype,
        "kv_bytes_per_token": kv_bytes_per_token(c, o.context, o.batch, o.kv_dtype),
        "context": o.context,
        "batch": o.batch,
        "kv_bytes_at_context": kv_bytes(c, o.context, o.batch, o.kv_dtype),
        # the family's contrast cache at the same context (V4: DeepSeek-V3's MLA cache); the key
        # keeps its name for readers of the JSON output
        "deepseek_v3_kv_bytes_at_context": (
            kv_bytes(get_preset(contrast), o.context, o.batch, o.kv_dtype) if contrast else None
        ),
        "training_per_gpu": {
            "dp": o.dp,
            "ep": o.ep,
            "pp": o.pp,
            "zero": o.zero,
            **training_bytes_per_gpu(c, o.dp, o.ep, o.pp, o.zero),
        },
    }


def _training(c: ModelConfig, o: Options, gpu: Gpu) -> dict[str, Any]:
    out: dict[str, Any] = {
        "tokens": o.tokens,
        "seq_len": o.seq_len,
        "flops": training_flops(c, o.tokens, o.seq_len),
        "gpu": gpu.name,
        "precision": o.precision,
        "mfu": o.mfu,
        "gpu_hours": gpu_hours(c, o.tokens, o.seq_len, gpu, o.mfu, o.precision),
    }
    if o.gpu_hours is not None:
        out["reported_gpu_hours"] = o.gpu_hours
        out["implied_mfu"] = implied_mfu(c, o.tokens, o.seq_len, gpu, o.gpu_hours, o.precision)
    return out


def dense_summary(d: DenseContrast, o: Options) -> dict[str, Any]:
    """A dense model given only by its count: every parameter active, FLOPs 2N (6N training)."""
    g = get_gpu(o.gpu)
    train = 6 * d.params * o.tokens
    return {
        "name": d.name,
        "note": d.note,
        "params": d.params,
        "forward_flops_per_token": d.forward_flops_per_token(),
        "train_flops_per_token": 6 * d.params,
        "weights": {k: d.weight_bytes(k) for k in BYTES},
        "gpu_hours": train
        / (o.mfu * (g.bf16_tflops if o.precision == "bf16" else g.fp8_tflops) * 1e12)
        / 3600,
    }


__all__ = ["Options", "dense_summary", "summary"]
