"""Published figures of real releases, each compared with the count that uses the same convention,
DeepSeek-V3's reported training cost, and the dense contrast rows (counts only, no ModelConfig).

Model cards disagree on conventions (with or without the input embedding, with or without MTP):
`computed_quantity` names each convention, and docs/cost.md explains every deviation in the notes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from widemoe.config import ModelConfig
from widemoe.cost.counts import count_params, mtp_redundant_copies
from widemoe.cost.hardware import get_gpu, implied_mfu
from widemoe.cost.memory import BYTES
from widemoe.cost.units import parse_amount
from widemoe.presets import get_preset


@dataclass(frozen=True)
class DenseContrast:
    name: str
    params: float  # all active
    note: str

    def forward_flops_per_token(self) -> float:
        return 2 * self.params

    def weight_bytes(self, dtype: str) -> float:
        return self.params * BYTES[dtype]


GPT5_CLASS_DENSE = DenseContrast("dense-1.8T", 1.8e12, "seed article's dense GPT-5-class estimate")


@dataclass(frozen=True)
class Published:
    model: str  # preset name
    quantity: str  # a key of `computed_quantity`
    text: str  # as published, e.g. "2.4B"
    source: str
    note: str = ""

    @property
    def value(self) -> float:
        return parse_amount(self.text)


def computed_quantity(c: ModelConfig, key: str) -> float:
    p = count_params(c)
    shared = p.total["embedding"] + p.total["head"]
    return {
        "total": p.main_total,
        "total_on_disk": p.total_with_mtp + mtp_redundant_copies(c),
        "active_with_embedding": p.active_with_embedding,
        "active_without_embedding": p.active_without_embedding,
        "mtp": p.mtp,
        "mtp_active_with_shared": sum(p.mtp_active.values()) + shared,
    }[key]


_V3 = "deepseek-ai/DeepSeek-V3 README.md"
_V3W = "deepseek-ai/DeepSeek-V3 README_WEIGHTS.md"
PUBLISHED: tuple[Published, ...] = (
    Published("deepseek-v3", "total", "671B", _V3),
    Published("deepseek-v3", "total_on_disk", "685B", _V3,
              "671B main + 14B MTP incl. its embedding/head copies"),
    Published("deepseek-v3", "active_without_embedding", "37B", _V3, "with the input embedding: 37.55B"),
    Published("deepseek-v3", "active_without_embedding", "36.7B", _V3W,
              "says 'incl. 0.9B embedding + 0.9B head'; the sum holds with only one of the two"),
    Published("deepseek-v3", "mtp", "11.5B", _V3W, "unique; 11.51B if eh_proj (0.10B) is left out"),
    Published("deepseek-v3", "mtp_active_with_shared", "2.4B", _V3W,
              "incl. shared embedding + head; 2.44B if eh_proj (0.10B) is left out"),
    Published("kimi-k2", "total", "1.04T", "Kimi K2 tech report (arXiv:2507.20534); model card: 1T",
              "released config has no MTP; one extra MoE-layer-sized module (17B) would give 1.043T"),
    Published("kimi-k2", "active_without_embedding", "32B", "moonshotai/Kimi-K2 model card"),
    Published("deepseek-v2-lite", "total", "15.7B", "DeepSeek-V2 paper / model card"),
    Published("deepseek-v2-lite", "active_without_embedding", "2.4B", "DeepSeek-V2 paper / model card",
              "2.45B truncated to 2.4B"),
    Published("qwen3-30b-a3b", "total", "30.5B", "Qwen/Qwen3-30B-A3B model card"),
    Published("qwen3-30b-a3b", "active_with_embedding", "3.3B", "Qwen/Qwen3-30B-A3B model card",
              "3.35B truncated to 3.3B; without the embedding 3.04B"),
    Published("qwen3-235b-a22b", "total", "235B", "Qwen/Qwen3-235B-A22B model card"),
    Published("qwen3-235b-a22b", "active_with_embedding", "22B", "Qwen/Qwen3-235B-A22B model card"),
    Published("mixtral-8x7b", "total", "46.7B", "Mixtral of Experts (arXiv:2401.04088)"),
    Published("mixtral-8x7b", "active_with_embedding", "12.9B", "Mixtral of Experts (arXiv:2401.04088)"),
    Published("olmoe-1b-7b", "total", "6.9B", "OLMoE (arXiv:2409.02060)"),
    Published("olmoe-1b-7b", "active_with_embedding", "1.3B", "OLMoE (arXiv:2409.02060)"),
)


# DeepSeek-V4 model cards: totals count the main model without MTP; the active counts match
# "everything but the input embedding, K of E experts in every layer" (hash layers included).
_V4F, _V4P = "deepseek-ai/DeepSeek-V4-Flash model card", "deepseek-ai/DeepSeek-V4-Pro model card"
PUBLISHED_V4: tuple[Published, ...] = (
    Published("deepseek-v4-flash", "total", "284B", _V4F, "main model without the MTP block (6.6B)"),
    Published("deepseek-v4-flash", "active_without_embedding", "13B", _V4F, "with the embedding: 13.8B"),
    Published("deepseek-v4-pro", "total", "1.6T", _V4P, "1.573T without MTP (1.599T with it)"),
    Published("deepseek-v4-pro", "active_without_embedding", "49B", _V4P, "with the embedding: 49.8B"),
)


def check_published(fig: Published) -> dict[str, Any]:
    """Computed vs published: relative deviation and whether it is within 1% or at the published precision."""
    computed = computed_quantity(get_preset(fig.model), fig.quantity)
    value = fig.value
    rel = computed / value - 1
    decimals = len(fig.text.rstrip("kKMBTG").partition(".")[2])
    step = value / float(fig.text.rstrip("kKMBTG")) * 10.0 ** -decimals
    if abs(rel) <= 0.01:
        status = "within 1%"
    elif round(computed / step) * step == value or math.floor(computed / step) * step == value:
        status = "at published precision"
    else:
        status = "differs (see note)"
    return {"model": fig.model, "quantity": fig.quantity, "published": value, "published_text": fig.text,
            "computed": computed, "deviation": rel, "status": status, "source": fig.source, "note": fig.note}


# DeepSeek-V3 paper Table 1: 2.664M H800 GPU-hours of pre-training on 14.8T tokens, 2.788M in all
# (with 119K context extension and 5K post-training). Sequence length 4096 in pre-training.
V3_TRAINING = {"tokens": 14.8e12, "seq_len": 4096, "gpu": "H800", "gpu_hours_total": 2.788e6,
               "gpu_hours_pretraining": 2.664e6}


def v3_implied_mfu() -> dict[str, float]:
    c, t = get_preset("deepseek-v3"), V3_TRAINING
    g = get_gpu(t["gpu"])
    return {f"{h}_{prec}": implied_mfu(c, t["tokens"], t["seq_len"], g, t[f"gpu_hours_{h}"], prec)
            for h in ("total", "pretraining") for prec in ("bf16", "fp8")}


__all__ = ["GPT5_CLASS_DENSE", "PUBLISHED", "PUBLISHED_V4", "V3_TRAINING", "DenseContrast", "Published",
           "check_published", "computed_quantity", "v3_implied_mfu"]
