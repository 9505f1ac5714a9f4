"""Model presets: the published dimensions of real MoE releases, and small sizes for the CPU.

Real models carry the values of their config.json files (collected in
``shared/reference/architecture.md`` section (g) and ``deepseek_v4.md``); `tiny` is the CPU demo size
and `micro` the test size, both DeepSeek-V3 in miniature. `get_preset(name, **overrides)` returns a
validated `ModelConfig`; `config_from_file(path)` reads a config file that may start from a preset.
The `v4-seed` design is explained in docs/cost.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from widemoe.config import V4_LAYER_TYPES, ConfigError, ModelConfig, check_known_fields


def _yarn(factor: float, L0: int, beta_fast: float = 32, beta_slow: float = 1, mscale: float = 1.0,
          mscale_all_dim: float = 1.0) -> dict[str, Any]:
    return {"type": "yarn", "factor": factor, "original_max_position_embeddings": L0, "beta_fast": beta_fast,
            "beta_slow": beta_slow, "mscale": mscale, "mscale_all_dim": mscale_all_dim}


# One line per subject (sizes, experts, router, attention, positions, heads and tokens, losses), in
# the order of ModelConfig's fields.
_DEEPSEEK_V3: dict[str, Any] = {
    "model_type": "deepseek_v3",
    "vocab_size": 129280, "hidden_size": 7168, "num_hidden_layers": 61, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 8, "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4,
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "num_attention_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128,
    "rope_theta": 10000.0, "rope_scaling": _yarn(40, 4096), "rope_interleave": True,
    "max_position_embeddings": 163840,
    "num_nextn_predict_layers": 1, "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1,
    "aux_loss_alpha": 1e-4,
}

# Routers of the softmax top-k families without shared experts (Qwen3-MoE, Mixtral, OLMoE), whose
# rope rotates halves instead of interleaved pairs.
_SOFTMAX_TOPK = {"n_shared_experts": 0, "scoring_func": "softmax", "topk_method": "greedy",
                 "rope_interleave": False}

# Fields both Qwen3-MoE releases share (their config.json files differ only in the dimensions)
_QWEN3_MOE: dict[str, Any] = {
    **_SOFTMAX_TOPK,
    "model_type": "qwen3_moe", "vocab_size": 151936,
    "n_routed_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "num_key_value_heads": 4, "head_dim": 128, "qk_norm": "head",
    "rope_theta": 1_000_000.0, "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6, "bos_token_id": 151643, "eos_token_id": 151645, "router_aux_loss_coef": 1e-3,
}

_PRESETS: dict[str, dict[str, Any]] = {
    "deepseek-v3": _DEEPSEEK_V3,
    "kimi-k2": {
        **_DEEPSEEK_V3,
        "model_type": "kimi_k2", "vocab_size": 163840,
        "first_k_dense_replace": 1, "n_routed_experts": 384, "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 2.827, "num_attention_heads": 64,
        "rope_theta": 50000.0, "rope_scaling": _yarn(32, 4096, beta_fast=1, beta_slow=1),
        "max_position_embeddings": 131072,
        "num_nextn_predict_layers": 0, "bos_token_id": 163584, "eos_token_id": 163585,
    },
    "deepseek-v2-lite": {
        "model_type": "deepseek_v2",
        "vocab_size": 102400, "hidden_size": 2048, "num_hidden_layers": 27, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "n_routed_experts": 64, "n_shared_experts": 2,
        "num_experts_per_tok": 6, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 1.0, "scoring_func": "softmax", "topk_method": "greedy",
        "norm_topk_prob": False,
        "num_attention_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128,
        "rope_theta": 10000.0, "rope_scaling": _yarn(40, 4096, mscale=0.707, mscale_all_dim=0.707),
        "rope_interleave": True, "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6, "bos_token_id": 100000, "eos_token_id": 100001, "aux_loss_alpha": 1e-3,
    },
    "qwen3-30b-a3b": {
        **_QWEN3_MOE,
        "hidden_size": 2048, "num_hidden_layers": 48, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_attention_heads": 32,
    },
    "qwen3-235b-a22b": {
        **_QWEN3_MOE,
        "hidden_size": 4096, "num_hidden_layers": 94, "intermediate_size": 12288,
        "moe_intermediate_size": 1536, "num_attention_heads": 64,
    },
    "mixtral-8x7b": {
        **_SOFTMAX_TOPK,
        "model_type": "mixtral",
        "vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 14336,
        "moe_intermediate_size": 14336, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "rope_theta": 1_000_000.0, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "router_aux_loss_coef": 0.02,
    },
    "olmoe-1b-7b": {
        **_SOFTMAX_TOPK,
        "model_type": "olmoe",
        "vocab_size": 50304, "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 1024,
        "moe_intermediate_size": 1024, "n_routed_experts": 64, "num_experts_per_tok": 8,
        "norm_topk_prob": False,
        "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 128, "qk_norm": "full",
        "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "bos_token_id": None, "eos_token_id": 50279, "pad_token_id": 1,
        "router_aux_loss_coef": 0.01, "router_z_loss_coef": 1e-3,
    },
    # Not a release: the seed article's DeepSeek-V4 description (about 1T total, about 32B active, 16
    # routed experts per token, fine-grained experts plus shared experts) on the V3 architecture.
    # V3's skeleton, Kimi K2's 64 heads, experts split in two (width 1024, top-16, 2 shared of the
    # new width = V3's one shared expert), E raised to 768 to reach ~1T. docs/cost.md derives it.
    "v4-seed": {
        **_DEEPSEEK_V3,
        "n_routed_experts": 768, "moe_intermediate_size": 1024, "num_experts_per_tok": 16,
        "n_shared_experts": 2, "num_attention_heads": 64,
    },
}

# The small DeepSeek-V3 sizes: V3's switches, one dense layer, 4 expert groups (2 kept), 4 heads, no
# BOS, EOS 0 (widemoe's tokenizers), no sequence-wise balance loss.
_SMALL_V3 = {**_DEEPSEEK_V3, "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2,
             "num_attention_heads": 4, "bos_token_id": None, "eos_token_id": 0, "aux_loss_alpha": 0.0}
# CPU demo size: DeepSeek-V3 style (MLA, fine-grained routed experts, one shared expert,
# sigmoid router, aux-loss-free balancing, one MTP module). Trains in minutes on 2 cores.
_PRESETS["tiny"] = {
    **_SMALL_V3,
    "vocab_size": 4096, "hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 768,
    "moe_intermediate_size": 128, "n_routed_experts": 32, "num_experts_per_tok": 6,
    "q_lora_rank": 96, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
    "rope_scaling": _yarn(4, 256), "max_position_embeddings": 1024,
}
# Test size: every DeepSeek-V3 feature at toy width (groups, bias, shared expert, MTP, YaRN with a
# short original length so tests run past it).
_PRESETS["micro"] = {
    **_SMALL_V3,
    "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 3, "intermediate_size": 128,
    "moe_intermediate_size": 32, "n_routed_experts": 8, "num_experts_per_tok": 2,
    "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "rope_scaling": _yarn(4, 32), "max_position_embeddings": 128,
}

# --- DeepSeek-V4 presets (shared/reference/deepseek_v4.md section 1, published config.json values).
_V4_SW, _V4_CSA, _V4_HCA = V4_LAYER_TYPES
# V4-Flash shares V3's vocabulary, routing switches, MTP and token ids; it drops MLA (one shared K=V
# head: no kv_lora_rank, nope or v widths) and V3's sequence-wise balance loss. Its YaRN has no mscale.
_DEEPSEEK_V4_FLASH = {
    **_DEEPSEEK_V3,
    "model_type": "deepseek_v4",
    "hidden_size": 4096, "num_hidden_layers": 43, "intermediate_size": 2048, "moe_intermediate_size": 2048,
    "num_experts_per_tok": 6, "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1,
    "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus",
    "num_attention_heads": 64, "num_key_value_heads": 1, "head_dim": 512, "q_lora_rank": 1024,
    "kv_lora_rank": None, "qk_nope_head_dim": 0, "v_head_dim": 0, "aux_loss_alpha": 0.0,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32,
                     "beta_slow": 1},
    "max_position_embeddings": 1048576,
    # compress_ratios [0,0] + [4,128]*20 + [4]: 2 sliding-only, 21 CSA, 20 HCA
    "layer_types": (_V4_SW, _V4_SW) + (_V4_CSA, _V4_HCA) * 20 + (_V4_CSA,),
    "compress_rate_csa": 4, "compress_rate_hca": 128, "compress_rope_theta": 160000.0, "sliding_window": 128,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "o_groups": 8, "o_lora_rank": 1024,
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "num_hash_layers": 3, "swiglu_limit": 10.0,
}
_PRESETS["deepseek-v4-flash"] = _DEEPSEEK_V4_FLASH
_PRESETS["deepseek-v4-pro"] = {
    **_DEEPSEEK_V4_FLASH,
    "hidden_size": 7168, "num_hidden_layers": 61, "moe_intermediate_size": 3072, "intermediate_size": 3072,
    "n_routed_experts": 384, "routed_scaling_factor": 2.5, "num_attention_heads": 128, "q_lora_rank": 1536,
    "o_groups": 16, "index_topk": 1024,
    # compress_ratios [128,128] + [4,128]*29 + [4]: 31 HCA, 30 CSA, no sliding-only layer
    "layer_types": (_V4_HCA, _V4_HCA) + (_V4_CSA, _V4_HCA) * 29 + (_V4_CSA,),
}
# CPU size with every V4 part: a sliding-only, two CSA and one HCA layer (real rates 4 and 128), one hash
# layer, four hyper-connection streams, sinks, grouped output projection, the indexer, one MTP block.
_PRESETS["v4-tiny"] = {
    **_DEEPSEEK_V4_FLASH,
    "vocab_size": 4096, "hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 128,
    "moe_intermediate_size": 128, "n_routed_experts": 16, "num_experts_per_tok": 4,
    "num_attention_heads": 4, "head_dim": 64, "q_lora_rank": 64, "qk_rope_head_dim": 16,
    "rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1},
    "max_position_embeddings": 16384 + 1024,
    "layer_types": (_V4_SW, _V4_CSA, _V4_HCA, _V4_CSA),
    "sliding_window": 64, "o_groups": 2, "o_lora_rank": 64, "index_n_heads": 4, "index_head_dim": 32,
    "index_topk": 64, "num_hash_layers": 1, "bos_token_id": None, "eos_token_id": 0,
    "index_loss_coef": 1.0,  # train the lightning indexer too (transformers' V4 leaves it without gradient)
}

PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset as a validated ModelConfig, with optional field overrides."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    d = dict(_PRESETS[name])
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = dict(d["rope_scaling"])
    check_known_fields(overrides, f"preset {name!r} overrides")
    d.update(overrides)
    return ModelConfig(**d)


def config_from_file(path: str | Path) -> ModelConfig:
    """Read a widemoe config file (JSON or TOML); a `preset` key starts from that preset."""
    return ModelConfig.from_file(path, presets=get_preset)


__all__ = ["PRESET_NAMES", "config_from_file", "get_preset"]
