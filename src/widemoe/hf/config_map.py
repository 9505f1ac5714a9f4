"""Hugging Face config.json <-> widemoe ModelConfig, one mapping per model family.

Families: ``deepseek_v3`` (also DeepSeek-R1 and Kimi K2, whose configs say ``kimi_k2`` with the
DeepseekV3 architecture), ``deepseek_v2`` (incl. V2-Lite), ``qwen3_moe``, ``mixtral``, ``olmoe``.
The semantics follow transformers 5.24's modeling files (our parity reference), e.g.

- Qwen3-MoE: layer i is MoE iff ``i not in mlp_only_layers`` and ``(i+1) % decoder_sparse_step == 0``;
  ``num_experts`` is an alias of ``num_local_experts``; qk-norm per head.
- Mixtral: the top-k weights are always renormalised; ``intermediate_size`` is the expert width.
- OLMoE: qk-norm over the full projection; ``norm_topk_prob`` defaults to false.
- DeepSeek-V2: transformers 5.24's router never renormalises (it ignores ``norm_topk_prob``), so
  widemoe loads V2 with ``norm_topk_prob=False`` and says so when the file asked for true.
- RoPE: both the legacy form (``rope_theta`` + ``rope_scaling``) and the v5 form (``rope_parameters``).

widemoe only accepts what it can run: an unsupported value (``hidden_act`` not silu, a sliding
window, ``clip_qkv``, a RoPE type other than default/yarn, ...) is a :class:`ConfigError` naming the
field. Fields that do not change the computation (``use_cache``, ``id2label``, ...) are ignored;
unknown fields are reported as notices. Nothing in a config is ever executed (``auto_map`` is ignored).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from widemoe.config import ConfigError, ModelConfig

FAMILIES = ("deepseek_v3", "deepseek_v2", "qwen3_moe", "mixtral", "olmoe")

ARCHITECTURES = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}
_ARCH_TO_FAMILY = {v: k for k, v in ARCHITECTURES.items()}
_MODEL_TYPE_TO_FAMILY = {**{f: f for f in FAMILIES}, "kimi_k2": "deepseek_v3"}

# transformers 5.24 class defaults used when a field is absent from config.json (only fields that
# change the computation; the core sizes are required).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": dict(
        n_shared_experts=1,
        first_k_dense_replace=3,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        rope_interleave=True,
        rms_norm_eps=1e-6,
        q_lora_rank=1536,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        kv_lora_rank=512,
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=1,
        num_nextn_predict_layers=0,
        rope_theta=10000.0,
    ),
    "deepseek_v2": dict(
        n_shared_experts=2,
        first_k_dense_replace=0,
        n_group=None,
        topk_group=None,
        routed_scaling_factor=1.0,
        topk_method="greedy",
        rms_norm_eps=1e-6,
        q_lora_rank=1536,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        kv_lora_rank=512,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        rope_theta=10000.0,
    ),
    "qwen3_moe": dict(
        num_key_value_heads=4,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=None,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        bos_token_id=None,
        eos_token_id=None,
        router_aux_loss_coef=0.001,
        intermediate_size=6144,
        rope_theta=10000.0,
    ),
    "mixtral": dict(
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096 * 32,
        bos_token_id=1,
        eos_token_id=2,
        router_aux_loss_coef=0.001,
        num_experts_per_tok=2,
        rope_theta=1e6,
    ),
    "olmoe": dict(
        num_key_value_heads=None,
        norm_topk_prob=False,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        bos_token_id=None,
        eos_token_id=50279,
        pad_token_id=1,
        router_aux_loss_coef=0.01,
        rope_theta=10000.0,
    ),
}

# Fields that never change the forward pass (or that widemoe reads elsewhere): ignored silently.
_IGNORED = {
    "_name_or_path",
    "architectures",
    "model_type",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "output_router_logits",
    "return_dict",
    "id2label",
    "label2id",
    "problem_type",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "pretraining_tp",
    "auto_map",
    "quantization_config",
    "initializer_range",
    "tie_word_embeddings",
    "head_dim",
    "qk_head_dim",
    "ep_size",
    "seq_aux",
    "num_key_value_heads",
    "widemoe",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "generation_config",
    "tokenizer_class",
    "attention_dropout",
    "sliding_window",
    "use_sliding_window",
    "max_window_layers",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "num_mtp_layers",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "hidden_act",
}
# widemoe-only fields round-trip through a "widemoe" block of config.json.
_WIDEMOE_ONLY = (
    "capacity_factor",
    "bias_update_speed",
    "mtp_loss_weight",
    "router_z_loss_coef",
    "aux_loss_alpha",
    "router_aux_loss_coef",
)


def detect_family(hf: dict[str, Any], *, source: str = "config.json") -> str:
    """The widemoe family of an HF config, from ``model_type`` and then ``architectures``."""
    mt = hf.get("model_type")
    if mt == "deepseek_v4" or "DeepseekV4ForCausalLM" in (hf.get("architectures") or []):
        return "deepseek_v4"  # its own mapping: widemoe.hf.deepseek_v4
    if mt in _MODEL_TYPE_TO_FAMILY:
        return _MODEL_TYPE_TO_FAMILY[mt]
    for arch in hf.get("architectures") or []:
        if arch in _ARCH_TO_FAMILY:
            return _ARCH_TO_FAMILY[arch]
    raise ConfigError(
        f"{source}: model_type={mt!r} / architectures={hf.get('architectures')!r} is not a supported "
        f"family; widemoe reads {', '.join(FAMILIES)} (and kimi_k2)"
    )


def _rope_from_hf(hf: dict[str, Any], family: str, max_pos: int, source: str) -> tuple[float, dict | None]:
    """(rope_theta, widemoe rope_scaling) from either the legacy or the v5 form."""
    params = hf.get("rope_parameters")
    legacy = hf.get("rope_scaling")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise ConfigError(
            f"{source}: rope_parameters is nested per layer type; widemoe uses one RoPE for all layers"
        )
    rp: dict[str, Any] = dict(legacy or {})
    if isinstance(params, dict):
        rp.update(params)
    theta = rp.get("rope_theta", hf.get("rope_theta", _DEFAULTS[family]["rope_theta"]))
    kind = rp.get("rope_type", rp.get("type", "default"))
    prf = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if prf not in (None, 1, 1.0):
        raise ConfigError(
            f"{source}: partial_rotary_factor={prf} is not supported (widemoe rotates the whole "
            "rope dimension)"
        )
    if kind == "default":
        return float(theta), None
    if kind != "yarn":
        raise ConfigError(
            f"{source}: rope type {kind!r} (rope_scaling/rope_parameters) is not supported; "
            "widemoe runs 'default' and 'yarn'"
        )
    L0 = rp.get("original_max_position_embeddings", hf.get("original_max_position_embeddings", max_pos))
    factor = rp.get("factor")
    if factor is None:  # transformers: the ratio of the extended to the original context
        factor = max_pos / L0
    # Keep exactly the keys the file sets: transformers' defaults depend on absence (e.g. the
    # attention factor is mscale(s, mscale)/mscale(s, mscale_all_dim) only when both are set), and
    # widemoe.model.layers mirrors that logic, including attention_factor and truncate.
    rs: dict[str, Any] = {
        "type": "yarn",
        "factor": float(factor),
        "original_max_position_embeddings": int(L0),
    }
    for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"):
        if rp.get(key) is not None:
            rs[key] = rp[key]
    return float(theta), rs


def hf_to_model_config(hf: dict[str, Any], *, source: str = "config.json") -> tuple[ModelConfig, list[str]]:
    """Map an HF config.json dict onto ModelConfig. Returns (config, notices)."""
    family = detect_family(hf, source=source)
    if family == "deepseek_v4":
        from widemoe.hf.deepseek_v4 import v4_config_from_hf

        return v4_config_from_hf(hf, source=source)
    D = _DEFAULTS[family]
    notices: list[str] = []
    used: set[str] = set()

    def get(key: str, *alts: str, required: bool = False) -> Any:
        for k in (key, *alts):
            if k in hf and (hf[k] is not None or not required):
                used.add(k)
                return hf[k]
        if required:
            raise ConfigError(f"{source}: required field {key!r} is missing or null ({family})")
        return D.get(key)

    def refuse(cond: bool, msg: str) -> None:
        if cond:
            raise ConfigError(f"{source}: {msg}")

    if hf.get("model_type") == "kimi_k2":
        notices.append("model_type 'kimi_k2' is read as the DeepSeek-V3 architecture")
    if hf.get("auto_map") or hf.get("trust_remote_code"):
        notices.append(
            "auto_map / remote code in config.json ignored: widemoe never executes code from a model "
            f"directory and runs its own {family} implementation"
        )
    used.update({"auto_map", "trust_remote_code"})
    act = get("hidden_act") or "silu"
    refuse(act != "silu", f"hidden_act={act!r} is not supported (only 'silu' SwiGLU)")
    drop = hf.get("attention_dropout") or 0.0
    refuse(drop != 0, f"attention_dropout={drop} is not supported (widemoe has no attention dropout)")
    eos = get("eos_token_id")
    if isinstance(eos, list):
        notices.append(f"eos_token_id={eos} is a list; widemoe uses the first id {eos[0] if eos else None}")
        eos = eos[0] if eos else None

    c: dict[str, Any] = dict(
        model_type="kimi_k2" if hf.get("model_type") == "kimi_k2" else family,
        vocab_size=get("vocab_size", required=True),
        hidden_size=get("hidden_size", required=True),
        num_hidden_layers=get("num_hidden_layers", required=True),
        num_attention_heads=get("num_attention_heads", required=True),
        max_position_embeddings=get("max_position_embeddings"),
        rms_norm_eps=float(get("rms_norm_eps")),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        initializer_range=float(hf.get("initializer_range", 0.02)),
        bos_token_id=get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=get("pad_token_id"),
    )
    theta, rope_scaling = _rope_from_hf(hf, family, c["max_position_embeddings"], source)
    c.update(rope_theta=theta, rope_scaling=rope_scaling)

    if family in ("deepseek_v3", "deepseek_v2"):
        refuse(bool(hf.get("attention_bias")), "attention_bias=true is not supported for MLA attention")
        refuse(bool(hf.get("mlp_bias")), "mlp_bias=true is not supported")
        mlf = hf.get("moe_layer_freq", 1)
        refuse(
            mlf != 1,
            f"moe_layer_freq={mlf} is not supported (transformers and widemoe use every layer "
            "from first_k_dense_replace on)",
        )
        used.update({"attention_bias", "mlp_bias", "moe_layer_freq"})
        c.update(
            intermediate_size=get("intermediate_size", required=True),
            moe_intermediate_size=get("moe_intermediate_size", required=True),
            n_routed_experts=get("n_routed_experts", "num_local_experts", "num_experts", required=True),
            n_shared_experts=get("n_shared_experts") or 0,
            num_experts_per_tok=get("num_experts_per_tok", required=True),
            first_k_dense_replace=get("first_k_dense_replace") or 0,
            n_group=get("n_group") or 1,
            topk_group=get("topk_group") or 1,
            routed_scaling_factor=float(get("routed_scaling_factor")),
            q_lora_rank=get("q_lora_rank") or None,
            kv_lora_rank=get("kv_lora_rank"),
            qk_nope_head_dim=get("qk_nope_head_dim"),
            qk_rope_head_dim=get("qk_rope_head_dim"),
            v_head_dim=get("v_head_dim"),
        )
        if "aux_loss_alpha" in hf:
            c["aux_loss_alpha"] = float(get("aux_loss_alpha"))
        if family == "deepseek_v3":
            sf = get("scoring_func") or "sigmoid"
            refuse(sf != "sigmoid", f"scoring_func={sf!r}: the DeepSeek-V3 architecture scores with sigmoid")
            tm = get("topk_method") or "noaux_tc"
            refuse(tm != "noaux_tc", f"topk_method={tm!r}: the DeepSeek-V3 architecture routes with noaux_tc")
            c.update(
                scoring_func="sigmoid",
                topk_method="noaux_tc",
                norm_topk_prob=bool(get("norm_topk_prob")),
                rope_interleave=bool(get("rope_interleave")),
                num_nextn_predict_layers=get("num_nextn_predict_layers", "num_mtp_layers") or 0,
            )
        else:
            sf = get("scoring_func") or "softmax"
            refuse(sf != "softmax", f"scoring_func={sf!r}: the DeepSeek-V2 architecture scores with softmax")
            tm = get("topk_method") or "greedy"
            refuse(
                tm not in ("greedy", "group_limited_greedy"),
                f"topk_method={tm!r} is not supported for deepseek_v2 (greedy or group_limited_greedy)",
            )
            if hf.get("norm_topk_prob"):
                notices.append(
                    "norm_topk_prob=true ignored: transformers 5.24's DeepSeek-V2 router never "
                    "renormalises, and widemoe matches it"
                )
            used.add("norm_topk_prob")
            mtp = hf.get("num_nextn_predict_layers") or 0
            refuse(mtp != 0, f"num_nextn_predict_layers={mtp}: DeepSeek-V2 has no MTP modules")
            used.add("num_nextn_predict_layers")
            c.update(scoring_func="softmax", topk_method=tm, norm_topk_prob=False, rope_interleave=True)
    else:
        refuse(bool(hf.get("mlp_bias")), "mlp_bias=true is not supported")
        used.add("mlp_bias")
        E = get("num_experts", "num_local_experts", "n_routed_experts", required=True)
        kvh = get("num_key_value_heads")
        hd = hf.get("head_dim")
        if hd is not None and c["hidden_size"] == hd * c["num_attention_heads"]:
            hd = None  # the implied width; keeps configs from both sides equal
        c.update(
            scoring_func="softmax",
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            n_shared_experts=0,
            routed_scaling_factor=1.0,
            num_key_value_heads=kvh,
            head_dim=hd,
            num_experts_per_tok=get("num_experts_per_tok", required=family != "mixtral"),
            n_routed_experts=E,
            rope_interleave=False,
            attention_bias=bool(get("attention_bias") or False),
            router_aux_loss_coef=float(get("router_aux_loss_coef")),
        )
        if family == "qwen3_moe":
            refuse(
                bool(hf.get("use_sliding_window")),
                "use_sliding_window=true is not supported (full attention only)",
            )
            step = get("decoder_sparse_step") or 1
            only = set(get("mlp_only_layers") or [])
            L = c["num_hidden_layers"]
            dense = sorted(i for i in range(L) if i in only or E == 0 or (i + 1) % step != 0)
            c.update(
                intermediate_size=get("intermediate_size"),
                qk_norm="head",
                moe_intermediate_size=get("moe_intermediate_size", required=True),
                norm_topk_prob=bool(get("norm_topk_prob")),
                mlp_only_layers=tuple(dense),
            )
            if E == 0:
                c.update(n_routed_experts=1, num_experts_per_tok=1)
        elif family == "mixtral":
            sw = hf.get("sliding_window")
            refuse(sw is not None, f"sliding_window={sw} is not supported (full attention only)")
            jit = get("router_jitter_noise") or 0.0
            refuse(jit != 0, f"router_jitter_noise={jit} is not supported")
            I = get("intermediate_size", required=True)
            c.update(intermediate_size=I, moe_intermediate_size=I, norm_topk_prob=True, attention_bias=False)
        else:  # olmoe
            clip = get("clip_qkv")
            refuse(clip is not None, f"clip_qkv={clip} is not supported")
            I = get("intermediate_size", required=True)
            c.update(
                intermediate_size=I,
                moe_intermediate_size=I,
                qk_norm="full",
                norm_topk_prob=bool(get("norm_topk_prob")),
            )

    wm = hf.get("widemoe") or {}
    for k, v in wm.items():
        if k == "source_model_type" and v == "kimi_k2" and family == "deepseek_v3":
            c["model_type"] = "kimi_k2"
        elif k in _WIDEMOE_ONLY:
            c[k] = v
        else:
            notices.append(f"widemoe.{k} in config.json is not a widemoe-only field; ignored")
    unknown = sorted(set(hf) - used - _IGNORED - set(c))
    if unknown:
        notices.append(f"config fields not used by widemoe: {', '.join(unknown)}")
    return ModelConfig(**c), notices


# ------------------------------------------------------------------------------------------------
# ModelConfig -> HF config.json


def export_family(cfg: ModelConfig) -> str:
    """The HF family a widemoe config is written as (kimi_k2 and widemoe-native models: deepseek_v3)."""
    return _MODEL_TYPE_TO_FAMILY.get(cfg.model_type, "deepseek_v3")


def model_config_to_hf(cfg: ModelConfig, *, dtype: str | None = None) -> dict[str, Any]:
    """An HF config.json dict that transformers 5.24 builds the same model from.

    Raises ConfigError naming the field when the config uses something the target family's
    transformers implementation cannot express (e.g. softmax routing in a deepseek_v3 model).
    """
    if cfg.is_v4:
        from widemoe.hf.deepseek_v4 import v4_config_to_hf

        return v4_config_to_hf(cfg, dtype=dtype)
    fam = export_family(cfg)

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(f"cannot write a {fam} config.json: {msg}")

    d: dict[str, Any] = dict(
        architectures=[ARCHITECTURES[fam]],
        model_type=fam,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        hidden_act="silu",
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        attention_dropout=0.0,
        use_cache=True,
    )
    rp: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        need(cfg.yarn is not None, f"rope_scaling={cfg.rope_scaling} is not YaRN")
        rp = {
            "rope_type": "yarn",
            "rope_theta": cfg.rope_theta,
            **{k: v for k, v in cfg.rope_scaling.items() if k not in ("type", "rope_type")},
        }
    d["rope_parameters"] = rp
    if dtype is not None:
        d["dtype"] = dtype
    need(
        cfg.mlp_only_layers == () or fam == "qwen3_moe",
        f"mlp_only_layers={list(cfg.mlp_only_layers)} exists only in qwen3_moe configs",
    )

    if fam in ("deepseek_v3", "deepseek_v2"):
        need(cfg.is_mla, "kv_lora_rank is null (GQA attention); DeepSeek families use MLA")
        need(cfg.qk_norm == "none" and not cfg.attention_bias, "qk_norm / attention_bias are not part of MLA")
        d.update(
            intermediate_size=cfg.intermediate_size,
            moe_intermediate_size=cfg.moe_intermediate_size,
            n_routed_experts=cfg.n_routed_experts,
            n_shared_experts=cfg.n_shared_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            first_k_dense_replace=cfg.first_k_dense_replace,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            routed_scaling_factor=cfg.routed_scaling_factor,
            q_lora_rank=cfg.q_lora_rank,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim,
            qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim,
            num_key_value_heads=cfg.num_attention_heads,
            attention_bias=False,
            scoring_func=cfg.scoring_func,
            topk_method=cfg.topk_method,
            aux_loss_alpha=cfg.aux_loss_alpha,
        )
        if fam == "deepseek_v3":
            need(
                cfg.scoring_func == "sigmoid",
                f"scoring_func={cfg.scoring_func!r} (transformers' DeepSeek-V3 is sigmoid)",
            )
            need(
                cfg.topk_method == "noaux_tc",
                f"topk_method={cfg.topk_method!r} (DeepSeek-V3 routes with noaux_tc)",
            )
            d.update(
                norm_topk_prob=cfg.norm_topk_prob,
                rope_interleave=cfg.rope_interleave,
                num_nextn_predict_layers=cfg.num_nextn_predict_layers,
            )
        else:
            need(cfg.scoring_func == "softmax", f"scoring_func={cfg.scoring_func!r} (DeepSeek-V2 is softmax)")
            need(cfg.topk_method in ("greedy", "group_limited_greedy"), f"topk_method={cfg.topk_method!r}")
            need(
                not cfg.norm_topk_prob,
                "norm_topk_prob=true (transformers' DeepSeek-V2 router never renormalises)",
            )
            need(cfg.rope_interleave, "rope_interleave=false (DeepSeek-V2 RoPE is interleaved)")
            need(cfg.num_nextn_predict_layers == 0, "num_nextn_predict_layers > 0 (DeepSeek-V2 has no MTP)")
            d.update(norm_topk_prob=False)
    else:
        need(not cfg.is_mla, f"kv_lora_rank={cfg.kv_lora_rank} (MLA exists only in DeepSeek families)")
        need(
            cfg.scoring_func == "softmax" and cfg.topk_method == "greedy" and cfg.n_group == 1,
            f"scoring_func={cfg.scoring_func!r}, topk_method={cfg.topk_method!r}, n_group={cfg.n_group}: "
            f"{fam} routes with plain softmax top-k",
        )
        need(
            cfg.n_shared_experts == 0,
            f"n_shared_experts={cfg.n_shared_experts} ({fam} has no shared experts)",
        )
        need(
            cfg.routed_scaling_factor == 1.0,
            f"routed_scaling_factor={cfg.routed_scaling_factor} ({fam} has none)",
        )
        need(not cfg.rope_interleave, f"rope_interleave=true ({fam} uses rotate-half RoPE)")
        need(cfg.rope_scaling is None, "rope_scaling set (YaRN is supported for DeepSeek families only)")
        need(cfg.num_nextn_predict_layers == 0, f"num_nextn_predict_layers > 0 ({fam} has no MTP)")
        d.update(
            num_key_value_heads=cfg.kv_heads,
            head_dim=cfg.gqa_head_dim,
            num_experts_per_tok=cfg.num_experts_per_tok,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
        )
        if fam == "qwen3_moe":
            need(cfg.qk_norm == "head", f"qk_norm={cfg.qk_norm!r} (Qwen3-MoE normalises q/k per head)")
            dense = sorted({i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)})
            d.update(
                num_experts=cfg.n_routed_experts,
                moe_intermediate_size=cfg.moe_intermediate_size,
                intermediate_size=cfg.intermediate_size,
                norm_topk_prob=cfg.norm_topk_prob,
                decoder_sparse_step=1,
                mlp_only_layers=dense,
                attention_bias=cfg.attention_bias,
                use_sliding_window=False,
                sliding_window=None,
            )
        else:
            need(
                cfg.moe_layer_indices == list(range(cfg.num_hidden_layers)),
                f"first_k_dense_replace={cfg.first_k_dense_replace} ({fam} has only MoE layers)",
            )
            if fam == "mixtral":
                need(
                    cfg.qk_norm == "none" and not cfg.attention_bias,
                    "qk_norm / attention_bias (Mixtral has neither)",
                )
                need(cfg.norm_topk_prob, "norm_topk_prob=false (Mixtral always renormalises)")
                d.update(
                    num_local_experts=cfg.n_routed_experts,
                    intermediate_size=cfg.moe_intermediate_size,
                    sliding_window=None,
                    router_jitter_noise=0.0,
                )
            else:
                need(
                    cfg.qk_norm == "full",
                    f"qk_norm={cfg.qk_norm!r} (OLMoE normalises the full q/k projection)",
                )
                d.update(
                    num_experts=cfg.n_routed_experts,
                    intermediate_size=cfg.moe_intermediate_size,
                    norm_topk_prob=cfg.norm_topk_prob,
                    attention_bias=cfg.attention_bias,
                    clip_qkv=None,
                )
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    d["widemoe"] = {k: getattr(cfg, k) for k in _WIDEMOE_ONLY if getattr(cfg, k) != defaults[k]}
    if cfg.model_type == "kimi_k2":
        d["widemoe"]["source_model_type"] = "kimi_k2"
    return d


__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "detect_family",
    "export_family",
    "hf_to_model_config",
    "model_config_to_hf",
]
