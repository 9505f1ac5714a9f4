"""DeepSeek-V4: config.json mapping (the transformers form and the release's legacy keys) and the
native and transformers tensor names, both directions.

Reference: shared/reference/deepseek_v4.md sections 1 and 6 (transformers 5.24's `DeepseekV4Config` and
its `conversion_mapping["deepseek_v4"]` rename table, and the published checkpoint listings).

Names accepted on load, all mapped onto widemoe's (= transformers' in-memory) names:
- **native** (DeepSeek's release, no prefix): ``embed``, ``head``, ``norm``, ``hc_head_{fn,base,scale}``,
  ``layers.N.{attn_norm,ffn_norm,hc_attn_*,hc_ffn_*}``, ``layers.N.attn.{wq_a,q_norm,wq_b,wkv,kv_norm,
  wo_a,wo_b,attn_sink}``, ``layers.N.attn.compressor.{wkv,wgate,ape,norm}``,
  ``layers.N.attn.indexer.{wq_b,weights_proj,compressor.*}``, ``layers.N.ffn.gate.{weight,bias,tid2eid}``,
  ``layers.N.ffn.experts.M.{w1,w3,w2}`` (merged into ``gate_up_proj`` / ``down_proj``),
  ``layers.N.ffn.shared_experts.{w1,w2,w3}``, and the MTP block ``mtp.K.*`` (``e_proj``, ``h_proj``,
  ``enorm``, ``hnorm``, ``norm``, ``hc_head_*`` and one layer's keys, flattened);
- **transformers** ``save_pretrained`` output: the same leaves under a ``model.`` prefix, with
  ``model.embed_tokens``, ``model.norm``, ``model.hc_head.hc_*``, unprefixed ``head`` and ``attn.norm``
  for the attention's ``kv_norm`` (its reverse rename);
- widemoe / transformers in-memory names (fused experts) as they are.

Quantised tensors: FP8 e4m3 with 128x128 block scales (`widemoe.hf.fp8`) and FP4 e2m1 routed experts
(`widemoe.hf.fp4`); the scale sits at native ``<name>.scale`` or transformers' ``<name>.weight_scale_inv``.
Saving writes unquantised tensors, ``layout="transformers"`` (the default; what transformers' own
``save_pretrained`` writes) or ``layout="native"`` (DeepSeek's names, legacy config keys:
``compress_ratios``, ``num_hash_layers``, ``qk_rope_head_dim``, ``rope_scaling``).
"""

from __future__ import annotations

import re
from typing import Any

from widemoe.config import V4_LAYER_TYPES, ConfigError, ModelConfig, check_field_value, config_source
from widemoe.hf.families.base import FamilyAdapter, Redundant, Shapes, Slot, expert_slot, stacked_expert_keys
from widemoe.hf.families.common import check_mapping, check_raw

SW, CSA, HCA = V4_LAYER_TYPES
_RATIO_TO_TYPE = {0: SW, 4: CSA, 128: HCA}
_TYPE_TO_RATIO = {v: k for k, v in _RATIO_TO_TYPE.items()}

# transformers 5.24 DeepseekV4Config defaults for fields a config.json may leave out
_DEFAULTS: dict[str, Any] = dict(
    vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=43,
    num_attention_heads=64, head_dim=512, q_lora_rank=1024, num_experts_per_tok=6, n_routed_experts=256,
    n_shared_experts=1, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5,
    max_position_embeddings=1048576, rope_theta=10000.0, compress_rope_theta=160000.0, hc_mult=4,
    hc_sinkhorn_iters=20, hc_eps=1e-6, swiglu_limit=10.0, sliding_window=128, o_groups=8, o_lora_rank=1024,
    index_n_heads=64, index_head_dim=128, index_topk=512, num_nextn_predict_layers=1, rms_norm_eps=1e-6,
    initializer_range=0.02, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None,
)  # fmt: skip

# ------------------------------------------------------------------------------------------------
# config.json


def _getter(hf: dict[str, Any], source: str) -> Any:
    """``get(field, *alternative keys)``: the first non-null value, checked against the type of
    ModelConfig's `field` (ConfigError naming the key), else transformers' default."""

    def get(key: str, *alts: str) -> Any:
        for k in (key, *alts):
            if hf.get(k) is not None:
                return check_field_value(key, hf[k], key=k, source=source)
        return _DEFAULTS.get(key)

    return get


def _layer_schedule(
    hf: dict[str, Any], L: int, source: str, notices: list[str]
) -> tuple[tuple[str, ...], int]:
    """(attention type per layer, number of hash-routed layers) from the modern or the legacy keys."""
    if hf.get("layer_types") is not None:
        types = check_field_value("layer_types", hf["layer_types"], source=source)[:L]
    elif hf.get("compress_ratios") is not None:
        ratios = check_raw("compress_ratios", hf["compress_ratios"], tuple, source, item=int)
        bad = [r for r in ratios if r not in _RATIO_TO_TYPE]
        if bad:
            raise ConfigError(f"{source}: compress_ratios contains {bad}; each entry must be 0, 4 or 128")
        types = tuple(_RATIO_TO_TYPE[r] for r in ratios[:L])
        if len(hf["compress_ratios"]) > L:
            notices.append(
                f"compress_ratios has {len(hf['compress_ratios'])} entries for {L} layers; "
                "the trailing ones (MTP) are ignored"
            )
    else:
        types = ()  # transformers' default schedule
    if hf.get("mlp_layer_types") is not None:
        mlp = list(check_raw("mlp_layer_types", hf["mlp_layer_types"], tuple, source, item=str)[:L])
        n_hash = sum(t == "hash_moe" for t in mlp)
        if mlp != ["hash_moe"] * n_hash + ["moe"] * (len(mlp) - n_hash):
            raise ConfigError(f"{source}: mlp_layer_types={mlp} must be hash_moe layers first, then moe")
    else:
        n_hash = check_raw("num_hash_layers", hf.get("num_hash_layers"), int, source)
        n_hash = min(L, 3 if n_hash is None else n_hash)
    return types, n_hash


def _rope(hf: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """(main rope params, compress rope params, widemoe rope_scaling). "main" is plain rope_theta;
    YaRN (legacy rope_scaling or flat/nested rope_parameters) applies to the "compress" rope only."""
    rp = check_mapping("rope_parameters", hf.get("rope_parameters"), source)
    comp = rp.get("compress") if isinstance(rp.get("compress"), dict) else rp
    main = rp.get("main") if isinstance(rp.get("main"), dict) else {}
    legacy = check_mapping("rope_scaling", hf.get("rope_scaling"), source)
    rs_src = {**legacy, **{k: v for k, v in comp.items() if k != "rope_theta"}}
    kind = rs_src.get("rope_type", rs_src.get("type", "default"))
    if kind == "default":
        return main, comp, None
    if kind != "yarn":
        raise ConfigError(f"{source}: rope type {kind!r} is not supported for deepseek_v4 (default or yarn)")
    rope_scaling = {
        "type": "yarn",
        "factor": check_raw("factor", rs_src.get("factor"), float, source),
        "original_max_position_embeddings": check_raw(
            "original_max_position_embeddings", rs_src.get("original_max_position_embeddings"), int, source
        ),
    }
    for k in ("beta_fast", "beta_slow", "truncate"):
        if rs_src.get(k) is not None:
            rope_scaling[k] = rs_src[k]
    if rs_src.get("attention_factor") not in (None, 1, 1.0):
        raise ConfigError(
            f"{source}: rope attention_factor={rs_src['attention_factor']} is not "
            "supported for deepseek_v4 (the compress rope is unscaled)"
        )
    return main, comp, rope_scaling


def _v4_fields(
    hf: dict[str, Any], get: Any, comp: dict[str, Any], n_hash: int, source: str
) -> dict[str, Any]:
    """The V4-only ModelConfig fields (compression, hyper-connections, grouped output, indexer)."""
    rates = check_raw("compress_rates", hf.get("compress_rates"), dict, source) or {}

    def rate(field: str, kind: str, default: int) -> int:
        if hf.get(field) is not None:
            return check_field_value(field, hf[field], source=source)
        v = check_field_value(field, rates.get(kind, default), key=f"compress_rates.{kind}", source=source)
        return v

    theta = comp.get("rope_theta")
    return dict(
        compress_rate_csa=rate("compress_rate_csa", CSA, 4),
        compress_rate_hca=rate("compress_rate_hca", HCA, 128),
        compress_rope_theta=get("compress_rope_theta") if theta is None else _checked_theta(theta, source),
        sliding_window=int(get("sliding_window")),
        hc_mult=int(get("hc_mult")),
        hc_sinkhorn_iters=int(get("hc_sinkhorn_iters")),
        hc_eps=float(get("hc_eps")),
        o_groups=int(get("o_groups")),
        o_lora_rank=int(get("o_lora_rank")),
        index_n_heads=int(get("index_n_heads")),
        index_head_dim=int(get("index_head_dim")),
        index_topk=int(get("index_topk")),
        num_hash_layers=n_hash,
        swiglu_limit=None if get("swiglu_limit") is None else float(get("swiglu_limit")),
    )


def config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> tuple[ModelConfig, list[str]]:
    """ModelConfig of a V4 config.json in the modern (transformers) or the legacy (release) form."""
    notices: list[str] = []
    get = _getter(hf, source)
    L = int(get("num_hidden_layers"))
    head_dim = int(get("head_dim"))
    if hf.get("qk_rope_head_dim") is not None:
        rope = get("qk_rope_head_dim")
    else:
        rope = int(round(head_dim * (check_raw("partial_rotary_factor", hf.get("partial_rotary_factor"),
                                               float, source) or 64 / 512)))  # fmt: skip
    types, n_hash = _layer_schedule(hf, L, source, notices)
    main, comp, rope_scaling = _rope(hf, source)
    if check_raw("num_key_value_heads", hf.get("num_key_value_heads"), int, source) not in (None, 1):
        raise ConfigError(
            f"{source}: num_key_value_heads={hf['num_key_value_heads']} must be 1 for deepseek_v4"
        )
    moe_I = int(get("moe_intermediate_size", "intermediate_size"))
    v4 = dict(_v4_fields(hf, get, comp, n_hash, source), router_aux_loss_coef=_aux_coef(hf, get, source))
    v4.update(rope_theta=float(_main_theta(main, get, source)), layer_types=types)
    kw: dict[str, Any] = dict(
        model_type="deepseek_v4", vocab_size=int(get("vocab_size")), hidden_size=int(get("hidden_size")),
        num_hidden_layers=L, intermediate_size=moe_I, moe_intermediate_size=moe_I,
        n_routed_experts=int(get("n_routed_experts", "num_local_experts")),
        n_shared_experts=min(1, int(get("n_shared_experts"))),
        num_experts_per_tok=int(get("num_experts_per_tok")),
        n_group=1, topk_group=1, routed_scaling_factor=float(get("routed_scaling_factor")),
        scoring_func=str(get("scoring_func")), topk_method="noaux_tc", norm_topk_prob=True,
        num_attention_heads=int(get("num_attention_heads")), num_key_value_heads=1, head_dim=head_dim,
        q_lora_rank=int(get("q_lora_rank")), qk_rope_head_dim=rope,
        rope_scaling=rope_scaling,
        rope_interleave=True, max_position_embeddings=int(get("max_position_embeddings")),
        num_nextn_predict_layers=int(get("num_nextn_predict_layers")),
        rms_norm_eps=float(get("rms_norm_eps")), tie_word_embeddings=bool(get("tie_word_embeddings")),
        initializer_range=float(get("initializer_range")),
        bos_token_id=get("bos_token_id"), eos_token_id=get("eos_token_id"),
        pad_token_id=get("pad_token_id"),
        **v4,
    )  # fmt: skip
    with config_source(source):  # ModelConfig's own rules name the file (the reads above name it already)
        cfg = ModelConfig(**kw)
    return cfg, notices


def _checked_theta(theta: Any, source: str) -> float:
    return check_field_value("compress_rope_theta", theta, key="rope_parameters.rope_theta", source=source)


def _main_theta(main: dict[str, Any], get: Any, source: str) -> Any:
    theta = main.get("rope_theta")
    if theta is None:
        return get("rope_theta")
    return check_field_value("rope_theta", theta, key="rope_parameters.main.rope_theta", source=source)


def _aux_coef(hf: dict[str, Any], get: Any, source: str) -> float:
    """router_aux_loss_coef counts only with ``output_router_logits`` (transformers' V4 loss)."""
    if not check_raw("output_router_logits", hf.get("output_router_logits"), bool, source):
        return 0.0
    return get("router_aux_loss_coef") or 0.0


def config_to_hf(cfg: ModelConfig, *, dtype: str | None = None, layout: str | None = None) -> dict[str, Any]:
    """config.json for `cfg`: modern transformers fields, plus the legacy release keys for ``native``."""
    types = list(cfg.v4_layer_types)
    prf = cfg.qk_rope_head_dim / cfg.gqa_head_dim
    yarn = {k: v for k, v in (cfg.rope_scaling or {}).items() if k not in ("type", "rope_type")}
    compress = {
        "rope_type": "yarn" if cfg.rope_scaling else "default",
        "rope_theta": cfg.compress_rope_theta,
        "partial_rotary_factor": prf,
        **yarn,
    }
    if cfg.rope_scaling:
        compress["attention_factor"] = 1.0
    d: dict[str, Any] = dict(
        architectures=[DeepSeekV4.architectures[0]], model_type="deepseek_v4", vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=1, head_dim=cfg.gqa_head_dim, q_lora_rank=cfg.q_lora_rank,
        partial_rotary_factor=prf,
        n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        n_shared_experts=cfg.n_shared_experts, scoring_func=cfg.scoring_func, norm_topk_prob=True,
        routed_scaling_factor=cfg.routed_scaling_factor, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, compress_rope_theta=cfg.compress_rope_theta,
        rope_parameters={"main": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                  "partial_rotary_factor": prf},
                         "compress": compress},
        layer_types=types, compress_rates={CSA: cfg.compress_rate_csa, HCA: cfg.compress_rate_hca},
        mlp_layer_types=["hash_moe" if i < cfg.num_hash_layers else "moe" for i in range(len(types))],
        hc_mult=cfg.hc_mult, hc_sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps,
        swiglu_limit=cfg.swiglu_limit, sliding_window=cfg.sliding_window, o_groups=cfg.o_groups,
        o_lora_rank=cfg.o_lora_rank, index_n_heads=cfg.index_n_heads, index_head_dim=cfg.index_head_dim,
        index_topk=cfg.index_topk, num_nextn_predict_layers=cfg.num_nextn_predict_layers,
        rms_norm_eps=cfg.rms_norm_eps, hidden_act="silu", tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id, attention_bias=False, attention_dropout=0.0, use_cache=True,
    )  # fmt: skip
    if dtype is not None:
        d["dtype"] = dtype
    if layout == "native":  # the release's legacy keys (transformers folds them in the same way)
        d.update(
            compress_ratios=[_TYPE_TO_RATIO[t] for t in types] + [0] * cfg.num_nextn_predict_layers,
            num_hash_layers=cfg.num_hash_layers,
            qk_rope_head_dim=cfg.qk_rope_head_dim,
            compress_rate_csa=cfg.compress_rate_csa,
            compress_rate_hca=cfg.compress_rate_hca,
            rope_scaling={"type": "yarn", **yarn} if cfg.rope_scaling else None,
        )
        for k in (
            "layer_types",
            "mlp_layer_types",
            "compress_rates",
            "rope_parameters",
            "partial_rotary_factor",
        ):
            d.pop(k)
    return d


# ------------------------------------------------------------------------------------------------
# key names

# layer-relative native leaf -> widemoe leaf (the first native spelling is the one written)
_LAYER: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    **{f"hc_{s}_{p}": f"{s}_hc.{p}" for s in ("attn", "ffn") for p in ("fn", "base", "scale")},
    "attn.wq_a.weight": "self_attn.q_a_proj.weight", "attn.q_norm.weight": "self_attn.q_a_norm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight", "attn.wkv.weight": "self_attn.kv_proj.weight",
    "attn.kv_norm.weight": "self_attn.kv_norm.weight", "attn.wo_a.weight": "self_attn.o_a_proj.weight",
    "attn.wo_b.weight": "self_attn.o_b_proj.weight", "attn.attn_sink": "self_attn.sinks",
    "attn.indexer.wq_b.weight": "self_attn.compressor.indexer.q_b_proj.weight",
    "attn.indexer.weights_proj.weight": "self_attn.compressor.indexer.scorer.weights_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight", "ffn.gate.bias": "mlp.gate.e_score_correction_bias",
    "ffn.gate.tid2eid": "mlp.gate.tid2eid",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
}  # fmt: skip
for _src, _dst in (
    ("attn.compressor.", "self_attn.compressor."),
    ("attn.indexer.compressor.", "self_attn.compressor.indexer."),
):
    _LAYER.update(
        {
            f"{_src}wkv.weight": f"{_dst}kv_proj.weight",
            f"{_src}wgate.weight": f"{_dst}gate_proj.weight",
            f"{_src}ape": f"{_dst}position_bias",
            f"{_src}norm.weight": f"{_dst}kv_norm.weight",
        }
    )
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_LAYER_ALIASES = {"attn.norm.weight": "self_attn.kv_norm.weight"}  # transformers' reverse rename
_TOP = {
    "embed.weight": "model.embed_tokens.weight",
    "head.weight": "lm_head.weight",
    "norm.weight": "model.norm.weight",
    "hc_head_fn": "model.hc_head.hc_fn",
    "hc_head_base": "model.hc_head.hc_base",
    "hc_head_scale": "model.hc_head.hc_scale",
}
_TOP_INV = {v: k for k, v in _TOP.items()}
_MTP_OWN = {"e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight"}
_EXPERT = re.compile(r"^ffn\.experts\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")
_W_PROJ = {"w1": "gate", "w3": "up", "w2": "down"}
_NATIVE_EXPERT_LEAVES = ("w1.weight", "w3.weight", "w2.weight")
_BLOCK = re.compile(r"^(?:model\.)?(?:(?P<kind>layers|mtp)\.(?P<n>\d+)\.)(?P<rest>.+)$")
_TARGET = re.compile(r"^model\.(?P<kind>layers|mtp)\.(?P<n>\d+)\.(?P<rest>.+)$")
_STACK = re.compile(r"^mlp\.experts\.(gate_up_proj|down_proj)$")


def _layer_slot(rest: str, prefix: str, shapes: Shapes) -> Slot | None:
    m = _EXPERT.match(rest)
    if m:
        return expert_slot(f"{prefix}.mlp.experts", int(m["e"]), _W_PROJ[m["w"]], shapes)
    leaf = _LAYER.get(rest) or _LAYER_ALIASES.get(rest)
    return Slot(f"{prefix}.{leaf}") if leaf else None


def source_slot(key: str, shapes: Shapes) -> Slot | None:
    """Destination of checkpoint tensor ``key`` (native, transformers-saved or widemoe name)."""
    if key in shapes:
        return Slot(key)
    bare = key[len("model.") :] if key.startswith("model.") else key
    if bare in _TOP:
        return Slot(_TOP[bare])
    if bare in ("embed_tokens.weight",):
        return Slot("model.embed_tokens.weight")
    if bare.startswith("hc_head.hc_"):
        return Slot(f"model.{bare}")
    m = _BLOCK.match(key)
    if not m:
        return None
    n, rest = int(m["n"]), m["rest"]
    if m["kind"] == "layers":
        return _layer_slot(rest, f"model.layers.{n}", shapes)
    base = f"model.mtp.{n}"
    if rest in _MTP_OWN:
        return Slot(f"{base}.{rest}")
    if rest.startswith("hc_head_"):
        return Slot(f"{base}.hc_head.hc_{rest[len('hc_head_') :]}")
    return _layer_slot(rest, f"{base}.block", shapes)


def target_keys(target: str, shape: tuple[int, ...], layout: str) -> list[tuple[str, Slot]]:
    """The checkpoint keys (and the part of ``target`` each holds) written for ``target``."""
    hf = layout == "transformers"
    if target in _TOP_INV:
        native = _TOP_INV[target]
        if hf and native != "head.weight":
            return [(target, Slot(target))]  # model.embed_tokens / model.norm / model.hc_head.hc_*
        return [(native, Slot(target))]
    m = _TARGET.match(target)
    if not m:
        return [(target, Slot(target))]
    rest = m["rest"]
    if m["kind"] == "layers":
        prefix = f"{'model.' if hf else ''}layers.{m['n']}"
    else:
        prefix = f"mtp.{m['n']}"  # transformers ignores mtp.* on load: always the native names
        if rest in _MTP_OWN:
            return [(f"{prefix}.{rest}", Slot(target))]
        if rest.startswith("hc_head.hc_"):
            return [(f"{prefix}.hc_head_{rest[len('hc_head.hc_') :]}", Slot(target))]
        rest = rest[len("block.") :]
    if _STACK.match(rest):
        return stacked_expert_keys(f"{prefix}.ffn.experts", target, shape, _NATIVE_EXPERT_LEAVES)
    leaf = _LAYER_INV[rest]
    if hf and leaf == "attn.kv_norm.weight":
        leaf = "attn.norm.weight"
    return [(f"{prefix}.{leaf}", Slot(target))]


class DeepSeekV4(FamilyAdapter):
    """DeepSeek-V4: hybrid compressed attention, hyper-connections, hash-routed first layers."""

    name = "deepseek_v4"
    model_types = ("deepseek_v4",)
    architectures = ("DeepseekV4ForCausalLM",)
    layouts = ("transformers", "native")
    accounting_layout = "native"  # the release's names: what users download
    fp4 = True

    def config_from_hf(self, hf: dict[str, Any], *, source: str) -> tuple[ModelConfig, list[str]]:
        return config_from_hf(hf, source=source)

    def config_to_hf(
        self, cfg: ModelConfig, *, dtype: str | None = None, layout: str | None = None
    ) -> dict[str, Any]:
        return config_to_hf(cfg, dtype=dtype, layout=layout or self.layouts[0])

    def config_file(self, cfg: ModelConfig, *, dtype: str | None, layout: str | None) -> dict[str, Any]:
        return self.config_to_hf(cfg, dtype=dtype, layout=layout)  # the legacy keys depend on the layout

    def source_slot(self, key: str, cfg: ModelConfig, shapes: Shapes) -> Slot | Redundant | None:
        return source_slot(key, shapes)

    def target_keys(
        self, target: str, shape: tuple[int, ...], cfg: ModelConfig, layout: str | None = None
    ) -> list[tuple[str, Slot]]:
        return target_keys(target, shape, layout or self.layouts[0])

    def scale_keys(self, key: str) -> tuple[str, ...]:
        stem = key[: -len(".weight")] if key.endswith(".weight") else key
        return (f"{stem}.scale", f"{key}_scale_inv")

    def is_scale_key(self, key: str) -> bool:
        return key.endswith(".scale") or key.endswith("_scale_inv")

    def mtp_keys(self, keys: list[str], cfg: ModelConfig) -> list[str]:
        """Native ``mtp.{k}.*`` or transformers' ``model.mtp.{k}.*``."""
        return [k for k in keys if re.match(r"^(model\.)?mtp\.", k)]

    def mtp_location(self, cfg: ModelConfig) -> str:
        return "mtp.{k}"

    def attention_summary(self, cfg: ModelConfig) -> str:
        return f"V4 MQA {cfg.num_attention_heads}x{cfg.head_dim}, window {cfg.sliding_window}"


ADAPTERS: tuple[FamilyAdapter, ...] = (DeepSeekV4(),)

__all__ = ["ADAPTERS", "DeepSeekV4", "config_from_hf", "config_to_hf", "source_slot", "target_keys"]
