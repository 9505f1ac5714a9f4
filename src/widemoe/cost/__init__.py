"""Cost calculator: parameters, FLOPs, memory, KV cache and training cost of a ModelConfig.

Pure arithmetic on `ModelConfig` (no torch). Every count is closed-form and is checked in the tests
against the model itself: the parameter total equals `sum(p.numel())` of `WideMoeForCausalLM` built on
the meta device, the KV figure equals `KVCache.nbytes()` after generation, and the forward FLOPs
agree with `torch.utils.flop_counter.FlopCounterMode`. Conventions and sources: docs/cost.md.

Modules, lowest first:
    units       CostError, parsing of '128k' / '14.8T', formatting of counts, bytes and FLOPs
    formulas    COMPONENTS, ParamCount, FamilyFormulas (the closed forms a family supplies)
    standard    the standard decoder's closed forms (MLA/GQA, SwiGLU, routed + shared experts, MTP)
    deepseek_v4 DeepSeek-V4's closed forms (hyper-connections, compressed attention and cache)
    families    model_type -> FamilyFormulas: the one place that names a family
    counts      count_params, FLOPs per token, training FLOPs
    memory      weight bytes per format, KV cache, AdamW memory per GPU
    hardware    the GPU catalogue, GPU-hours, implied MFU, serving GPUs
    published   published figures vs computed, DeepSeek-V3's training cost, dense contrast rows
    summary     one model's figures as a dict (the `widemoe cost` tables and --json)
    tables      rich tables of those dicts (plots are in widemoe.report.cost_plot)

Model specs (preset names, files, directories) are resolved by `widemoe.hf.resolve.resolve_model`.
"""

from widemoe.cost.counts import (
    Flops,
    attention_flops_per_token,
    count_params,
    flops_per_token,
    mtp_redundant_copies,
    training_flops,
)
from widemoe.cost.deepseek_v4 import v4_attention_flops_at, v4_kv_elements, v4_kv_growth_per_token
from widemoe.cost.families import FAMILIES, formulas_for
from widemoe.cost.formulas import COMPONENTS, QUANTISED, FamilyFormulas, ParamCount
from widemoe.cost.hardware import (
    GPUS,
    SERVING_MEMORY_SHARE,
    Gpu,
    get_gpu,
    gpu_hours,
    implied_mfu,
    peak_flops,
    serving_gpus,
)
from widemoe.cost.memory import (
    ADAMW_BYTES_PER_PARAM,
    BYTES,
    SCALE_BYTES,
    kv_bytes,
    kv_bytes_per_token,
    kv_elements_per_token_layer,
    kv_uncompressed_elements_per_token_layer,
    training_bytes_per_gpu,
    weight_bytes,
)
from widemoe.cost.published import (
    GPT5_CLASS_DENSE,
    PUBLISHED,
    PUBLISHED_V4,
    V3_TRAINING,
    DenseContrast,
    Published,
    check_published,
    computed_quantity,
    v3_implied_mfu,
)
from widemoe.cost.summary import Options, dense_summary, summary
from widemoe.cost.units import CostError, parse_amount, parse_context

__all__ = [
    "ADAMW_BYTES_PER_PARAM", "BYTES", "COMPONENTS", "CostError", "DenseContrast", "FAMILIES",
    "FamilyFormulas", "Flops", "GPT5_CLASS_DENSE", "GPUS", "Gpu", "Options", "PUBLISHED", "PUBLISHED_V4",
    "ParamCount", "Published", "QUANTISED", "SCALE_BYTES", "SERVING_MEMORY_SHARE", "V3_TRAINING",
    "attention_flops_per_token", "check_published", "computed_quantity", "count_params", "dense_summary",
    "flops_per_token", "formulas_for", "get_gpu", "gpu_hours", "implied_mfu", "kv_bytes",
    "kv_bytes_per_token", "kv_elements_per_token_layer", "kv_uncompressed_elements_per_token_layer",
    "mtp_redundant_copies", "parse_amount", "parse_context", "peak_flops", "serving_gpus", "summary",
    "training_bytes_per_gpu", "training_flops", "v3_implied_mfu", "v4_attention_flops_at", "v4_kv_elements",
    "v4_kv_growth_per_token", "weight_bytes",
]
