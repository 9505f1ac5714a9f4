"""DeepSeek-V4 checkpoints: config.json mapping, native and transformers key names, FP8/FP4 dequantisation,
strict loading and saving in either layout.

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

Quantised tensors (config.json ``quantization_config``, native ``<name>.scale`` or transformers'
``<name>.weight_scale_inv`` next to ``<name>.weight``):
- FP8 e4m3 weights with one scale per 128x128 block (``weight_block_size``), scales fp32 or ue8m0
  (``F8_E8M0``: 2^(byte-127)); partial edge blocks allowed (`widemoe.hf.fp8.dequantize`);
- FP4 e2m1 routed experts: int8 bytes holding two values each (low nibble first, last dim halved),
  values {0, .5, 1, 1.5, 2, 3, 4, 6} and their negatives, one ue8m0 scale per 1x32 block along the
  last dim (a partial last block allowed): `dequantize_fp4`.
Accounting is as strict as the other families: every source tensor and scale is consumed, every
parameter and persistent buffer written exactly once, else `LoadError` lists the keys.

Saving writes unquantised tensors, ``layout="native"`` (DeepSeek's names, legacy config keys:
``compress_ratios``, ``num_hash_layers``, ``qk_rope_head_dim``, ``rope_scaling``) or
``layout="transformers"`` (what transformers' own ``save_pretrained`` writes; reloads there).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from widemoe.config import V4_LAYER_TYPES, ConfigError, ModelConfig
from widemoe.hf import fp8 as fp8mod
from widemoe.hf.keymap import Slot
from widemoe.hf.loader import LoadError, LoadReport, TensorInfo, model_targets, read_tensor, target_shapes

SW, CSA, HCA = V4_LAYER_TYPES
ARCHITECTURE = "DeepseekV4ForCausalLM"
FP4_BLOCK = 32
# e2m1 code -> value; bit 3 is the sign
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                           -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_RATIO_TO_TYPE = {0: SW, 4: CSA, 128: HCA}

# ------------------------------------------------------------------------------------------------
# config.json


def is_v4_config(hf: dict[str, Any]) -> bool:
    return hf.get("model_type") == "deepseek_v4" or ARCHITECTURE in (hf.get("architectures") or [])


# transformers 5.24 DeepseekV4Config defaults for fields a config.json may leave out
_DEFAULTS: dict[str, Any] = dict(
    vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=43,
    num_attention_heads=64, head_dim=512, q_lora_rank=1024, num_experts_per_tok=6, n_routed_experts=256,
    n_shared_experts=1, scoring_func="sqrtsoftplus", routed_scaling_factor=1.5,
    max_position_embeddings=1048576, rope_theta=10000.0, compress_rope_theta=160000.0, hc_mult=4,
    hc_sinkhorn_iters=20, hc_eps=1e-6, swiglu_limit=10.0, sliding_window=128, o_groups=8, o_lora_rank=1024,
    index_n_heads=64, index_head_dim=128, index_topk=512, num_nextn_predict_layers=1, rms_norm_eps=1e-6,
    initializer_range=0.02, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=None,
)


def v4_config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> tuple[ModelConfig, list[str]]:
    """ModelConfig of a V4 config.json in the modern (transformers) or the legacy (release) form."""
    notices: list[str] = []

    def get(key: str, *alts: str) -> Any:
        for k in (key, *alts):
            if hf.get(k) is not None:
                return hf[k]
        return _DEFAULTS.get(key)

    L = int(get("num_hidden_layers"))
    head_dim = int(get("head_dim"))
    if hf.get("qk_rope_head_dim") is not None:
        rope = int(hf["qk_rope_head_dim"])
    else:
        rope = int(round(head_dim * float(hf.get("partial_rotary_factor") or 64 / 512)))
    rates = dict(hf.get("compress_rates") or {})
    csa = int(hf.get("compress_rate_csa") or rates.get(CSA, 4))
    hca = int(hf.get("compress_rate_hca") or rates.get(HCA, 128))
    if hf.get("layer_types") is not None:
        types = tuple(hf["layer_types"][:L])
    elif hf.get("compress_ratios") is not None:
        bad = [r for r in hf["compress_ratios"] if r not in _RATIO_TO_TYPE]
        if bad:
            raise ConfigError(f"{source}: compress_ratios contains {bad}; each entry must be 0, 4 or 128")
        types = tuple(_RATIO_TO_TYPE[r] for r in hf["compress_ratios"][:L])
        if len(hf["compress_ratios"]) > L:
            notices.append(f"compress_ratios has {len(hf['compress_ratios'])} entries for {L} layers; "
                           "the trailing ones (MTP) are ignored")
    else:
        types = ()  # transformers' default schedule
    if hf.get("mlp_layer_types") is not None:
        mlp = list(hf["mlp_layer_types"][:L])
        n_hash = sum(t == "hash_moe" for t in mlp)
        if mlp != ["hash_moe"] * n_hash + ["moe"] * (len(mlp) - n_hash):
            raise ConfigError(f"{source}: mlp_layer_types={mlp} must be hash_moe layers first, then moe")
    else:
        n_hash = min(L, int(hf["num_hash_layers"] if hf.get("num_hash_layers") is not None else 3))
    # RoPE: "main" is plain rope_theta; YaRN (legacy rope_scaling or flat/nested rope_parameters)
    # applies to the "compress" rope only.
    rp = hf.get("rope_parameters") or {}
    comp = rp.get("compress") if isinstance(rp.get("compress"), dict) else rp
    main = rp.get("main") if isinstance(rp.get("main"), dict) else {}
    rs_src = {**(hf.get("rope_scaling") or {}), **{k: v for k, v in comp.items() if k != "rope_theta"}}
    kind = rs_src.get("rope_type", rs_src.get("type", "default"))
    rope_scaling = None
    if kind == "yarn":
        rope_scaling = {"type": "yarn", "factor": float(rs_src["factor"]),
                        "original_max_position_embeddings": int(rs_src["original_max_position_embeddings"])}
        for k in ("beta_fast", "beta_slow", "truncate"):
            if rs_src.get(k) is not None:
                rope_scaling[k] = rs_src[k]
        if rs_src.get("attention_factor") not in (None, 1, 1.0):
            raise ConfigError(f"{source}: rope attention_factor={rs_src['attention_factor']} is not "
                              "supported for deepseek_v4 (the compress rope is unscaled)")
    elif kind != "default":
        raise ConfigError(f"{source}: rope type {kind!r} is not supported for deepseek_v4 (default or yarn)")
    if hf.get("num_key_value_heads") not in (None, 1):
        raise ConfigError(f"{source}: num_key_value_heads={hf['num_key_value_heads']} must be 1 "
                          "for deepseek_v4")
    moe_I = int(get("moe_intermediate_size", "intermediate_size"))
    cfg = ModelConfig(
        model_type="deepseek_v4", vocab_size=int(get("vocab_size")), hidden_size=int(get("hidden_size")),
        num_hidden_layers=L, intermediate_size=moe_I, moe_intermediate_size=moe_I,
        n_routed_experts=int(get("n_routed_experts", "num_local_experts")),
        n_shared_experts=min(1, int(get("n_shared_experts"))),
        num_experts_per_tok=int(get("num_experts_per_tok")),
        n_group=1, topk_group=1, routed_scaling_factor=float(get("routed_scaling_factor")),
        scoring_func=str(get("scoring_func")), topk_method="noaux_tc", norm_topk_prob=True,
        num_attention_heads=int(get("num_attention_heads")), num_key_value_heads=1, head_dim=head_dim,
        q_lora_rank=int(get("q_lora_rank")), qk_rope_head_dim=rope,
        rope_theta=float(main.get("rope_theta", get("rope_theta"))), rope_scaling=rope_scaling,
        rope_interleave=True, max_position_embeddings=int(get("max_position_embeddings")),
        num_nextn_predict_layers=int(get("num_nextn_predict_layers")),
        rms_norm_eps=float(get("rms_norm_eps")), tie_word_embeddings=bool(get("tie_word_embeddings")),
        initializer_range=float(get("initializer_range")),
        bos_token_id=get("bos_token_id"), eos_token_id=get("eos_token_id"), pad_token_id=get("pad_token_id"),
        router_aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0) if hf.get("output_router_logits")
        else 0.0,
        layer_types=types, compress_rate_csa=csa, compress_rate_hca=hca,
        compress_rope_theta=float(comp.get("rope_theta", get("compress_rope_theta"))),
        sliding_window=int(get("sliding_window")), hc_mult=int(get("hc_mult")),
        hc_sinkhorn_iters=int(get("hc_sinkhorn_iters")), hc_eps=float(get("hc_eps")),
        o_groups=int(get("o_groups")), o_lora_rank=int(get("o_lora_rank")),
        index_n_heads=int(get("index_n_heads")), index_head_dim=int(get("index_head_dim")),
        index_topk=int(get("index_topk")), num_hash_layers=n_hash,
        swiglu_limit=None if get("swiglu_limit") is None else float(get("swiglu_limit")),
    )
    return cfg, notices


def v4_config_to_hf(cfg: ModelConfig, *, dtype: str | None = None,
                    layout: str = "transformers") -> dict[str, Any]:
    """config.json for `cfg`: modern transformers fields, plus the legacy release keys for ``native``."""
    types = list(cfg.v4_layer_types)
    yarn = {k: v for k, v in (cfg.rope_scaling or {}).items() if k not in ("type", "rope_type")}
    compress = {"rope_type": "yarn" if cfg.rope_scaling else "default", "rope_theta": cfg.compress_rope_theta,
                "partial_rotary_factor": cfg.qk_rope_head_dim / cfg.gqa_head_dim, **yarn}
    if cfg.rope_scaling:
        compress["attention_factor"] = 1.0
    d: dict[str, Any] = dict(
        architectures=[ARCHITECTURE], model_type="deepseek_v4", vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, moe_intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=1, head_dim=cfg.gqa_head_dim, q_lora_rank=cfg.q_lora_rank,
        partial_rotary_factor=cfg.qk_rope_head_dim / cfg.gqa_head_dim,
        n_routed_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        n_shared_experts=cfg.n_shared_experts, scoring_func=cfg.scoring_func, norm_topk_prob=True,
        routed_scaling_factor=cfg.routed_scaling_factor, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, compress_rope_theta=cfg.compress_rope_theta,
        rope_parameters={"main": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                  "partial_rotary_factor": cfg.qk_rope_head_dim / cfg.gqa_head_dim},
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
    )
    if dtype is not None:
        d["dtype"] = dtype
    if layout == "native":  # the release's legacy keys (transformers folds them in the same way)
        ratio = {SW: 0, CSA: 4, HCA: 128}
        d.update(compress_ratios=[ratio[t] for t in types] + [0] * cfg.num_nextn_predict_layers,
                 num_hash_layers=cfg.num_hash_layers, qk_rope_head_dim=cfg.qk_rope_head_dim,
                 compress_rate_csa=cfg.compress_rate_csa, compress_rate_hca=cfg.compress_rate_hca,
                 rope_scaling={"type": "yarn", **yarn} if cfg.rope_scaling else None)
        for k in ("layer_types", "mlp_layer_types", "compress_rates", "rope_parameters",
                  "partial_rotary_factor"):
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
}
for _src, _dst in (("attn.compressor.", "self_attn.compressor."),
                   ("attn.indexer.compressor.", "self_attn.compressor.indexer.")):
    _LAYER.update({f"{_src}wkv.weight": f"{_dst}kv_proj.weight",
                   f"{_src}wgate.weight": f"{_dst}gate_proj.weight",
                   f"{_src}ape": f"{_dst}position_bias", f"{_src}norm.weight": f"{_dst}kv_norm.weight"})
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_LAYER_ALIASES = {"attn.norm.weight": "self_attn.kv_norm.weight"}  # transformers' reverse rename
_TOP = {"embed.weight": "model.embed_tokens.weight", "head.weight": "lm_head.weight",
        "norm.weight": "model.norm.weight", "hc_head_fn": "model.hc_head.hc_fn",
        "hc_head_base": "model.hc_head.hc_base", "hc_head_scale": "model.hc_head.hc_scale"}
_TOP_INV = {v: k for k, v in _TOP.items()}
_MTP_OWN = {"e_proj.weight", "h_proj.weight", "enorm.weight", "hnorm.weight", "norm.weight"}
_EXPERT = re.compile(r"^ffn\.experts\.(?P<e>\d+)\.(?P<w>w[123])\.weight$")
_BLOCK = re.compile(r"^(?:model\.)?(?:(?P<kind>layers|mtp)\.(?P<n>\d+)\.)(?P<rest>.+)$")


def _layer_slot(rest: str, prefix: str, shapes: dict[str, tuple[int, ...]]) -> Slot | None:
    m = _EXPERT.match(rest)
    if m:
        e, w = int(m["e"]), m["w"]
        if w == "w2":
            return Slot(f"{prefix}.mlp.experts.down_proj", e)
        gu = shapes.get(f"{prefix}.mlp.experts.gate_up_proj")
        if gu is None:
            return None
        I = gu[1] // 2
        return Slot(f"{prefix}.mlp.experts.gate_up_proj", e, (0, I) if w == "w1" else (I, 2 * I))
    leaf = _LAYER.get(rest) or _LAYER_ALIASES.get(rest)
    return Slot(f"{prefix}.{leaf}") if leaf else None


def v4_source_slot(key: str, shapes: dict[str, tuple[int, ...]]) -> Slot | None:
    """Destination of checkpoint tensor ``key`` (native, transformers-saved or widemoe name)."""
    if key in shapes:
        return Slot(key)
    bare = key[len("model."):] if key.startswith("model.") else key
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
        return Slot(f"{base}.hc_head.hc_{rest[len('hc_head_'):]}")
    return _layer_slot(rest, f"{base}.block", shapes)


def v4_target_keys(target: str, shape: tuple[int, ...], layout: str) -> list[tuple[str, Slot]]:
    """The checkpoint keys (and the part of ``target`` each holds) written for ``target``."""
    hf = layout == "transformers"
    if target in _TOP_INV:
        native = _TOP_INV[target]
        if hf and native != "head.weight":
            return [(target, Slot(target))]  # model.embed_tokens / model.norm / model.hc_head.hc_*
        return [(native, Slot(target))]
    m = re.match(r"^model\.(?P<kind>layers|mtp)\.(?P<n>\d+)\.(?P<rest>.+)$", target)
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
            return [(f"{prefix}.hc_head_{rest[len('hc_head.hc_'):]}", Slot(target))]
        rest = rest[len("block."):]
    ex = re.match(r"^mlp\.experts\.(gate_up_proj|down_proj)$", rest)
    if ex:
        out = []
        for e in range(shape[0]):
            if ex[1] == "down_proj":
                out.append((f"{prefix}.ffn.experts.{e}.w2.weight", Slot(target, e)))
            else:
                I = shape[1] // 2
                out += [(f"{prefix}.ffn.experts.{e}.w1.weight", Slot(target, e, (0, I))),
                        (f"{prefix}.ffn.experts.{e}.w3.weight", Slot(target, e, (I, 2 * I)))]
        return out
    leaf = _LAYER_INV[rest]
    if hf and leaf == "attn.kv_norm.weight":
        leaf = "attn.norm.weight"
    return [(f"{prefix}.{leaf}", Slot(target))]


# ------------------------------------------------------------------------------------------------
# FP4


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype = torch.float32
                   ) -> torch.Tensor:
    """e2m1 values two per byte (low nibble first) times one ue8m0 scale per 1x32 block of the last dim.

    ``packed [..., n/2]`` int8/uint8, ``scale [..., ceil(n/32)]`` (F8_E8M0, raw uint8 exponents, or fp32
    multipliers); returns ``[..., n]``.
    """
    b = packed.view(torch.uint8) if packed.dtype == torch.int8 else packed
    if b.dtype != torch.uint8:
        raise ValueError(f"FP4 weights must be stored as int8/uint8 bytes, got {packed.dtype}")
    n = b.shape[-1] * 2
    want = (*b.shape[:-1], math.ceil(n / FP4_BLOCK))
    if tuple(scale.shape) != want:
        raise ValueError(f"FP4 scale shape {list(scale.shape)} does not match weight {list(b.shape)} "
                         f"(two values per byte, one scale per {FP4_BLOCK}: expected {list(want)})")
    codes = torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(*b.shape[:-1], n)
    w = FP4_VALUES[codes.long()]
    s = fp8mod.scale_to_fp32(scale).repeat_interleave(FP4_BLOCK, dim=-1)[..., :n]
    return (w * s).to(out_dtype)


def quantize_fp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed int8 [..., n/2], ue8m0 scale [..., ceil(n/32)]) of ``w [..., n]`` (n even): each block's
    scale is the power of two that maps its largest magnitude to <= 6, values rounded to the nearest
    e2m1 value. The inverse of `dequantize_fp4` up to FP4 rounding (used by tests and tooling)."""
    n = w.shape[-1]
    if n % 2:
        raise ValueError(f"quantize_fp4: last dim {n} must be even (two values per byte)")
    nb = math.ceil(n / FP4_BLOCK)
    pad = nb * FP4_BLOCK - n
    wp = torch.nn.functional.pad(w.float(), (0, pad)).unflatten(-1, (nb, FP4_BLOCK))
    amax = wp.abs().amax(-1).clamp_min(2.0**-120)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    q = (wp / torch.exp2(exp)[..., None]).flatten(-2)[..., :n]
    mags = FP4_VALUES[:8]
    idx = (q.abs()[..., None] - mags).abs().argmin(-1)
    codes = (idx | ((q < 0).long() << 3)).to(torch.uint8)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).view(torch.int8)
    return packed, (exp + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


# ------------------------------------------------------------------------------------------------
# loading


def _scale_key(key: str, table: dict[str, TensorInfo]) -> str | None:
    stem = key[: -len(".weight")] if key.endswith(".weight") else key
    for k in (f"{stem}.scale", f"{key}_scale_inv"):
        if k in table:
            return k
    return None


_Read = tuple[TensorInfo, Slot, "TensorInfo | None", str]  # source, destination, scale, plain|fp8|fp4


def plan_v4(targets: dict[str, tuple[tuple[int, ...], torch.dtype]], table: dict[str, TensorInfo], *,
            block: tuple[int, int] | None, ignore: Iterable[str] = (), path: str = "checkpoint",
            ) -> tuple[list[_Read], LoadReport]:
    """Map every source tensor (and scale) to a destination and check the books; LoadError on any gap.
    ``block`` is the FP8 block of the config's quantization_config (None: the config declares none)."""
    pats = [re.compile(p) for p in ignore]
    ignored = lambda k: any(p.search(k) for p in pats)  # noqa: E731
    shapes = {k: v[0] for k, v in targets.items()}
    floating = {k: v[1].is_floating_point for k, v in targets.items()}
    report = LoadReport(path, family="deepseek_v4")
    missing: list[str] = []
    unexpected: list[str] = []
    mismatched: list[str] = []
    other: list[str] = []
    reads: list[tuple[TensorInfo, Slot, TensorInfo | None, str]] = []
    scales = {k for k in table if k.endswith(".scale") or k.endswith("_scale_inv")}
    used: set[str] = set()
    covered: dict[str, dict[Slot, str]] = {}
    for key in sorted(set(table) - scales):
        info = table[key]
        slot = v4_source_slot(key, shapes)
        if slot is None or slot.target not in shapes:
            (report.ignored if ignored(key) else unexpected).append(key)
            continue
        want = slot.shape(shapes[slot.target])
        sk = _scale_key(key, table)
        fmt = "plain"
        if info.dtype in (torch.int8, torch.uint8) and floating[slot.target]:
            fmt, got = "fp4", (*info.shape[:-1], info.shape[-1] * 2)
        elif info.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            fmt, got = "fp8", info.shape
        else:
            got = info.shape
        if tuple(got) != tuple(want):
            mismatched.append(f"{key}: expected {list(want)} vs found {list(got)}"
                              + (" (FP4: two values per byte)" if fmt == "fp4" else ""))
            continue
        scale = None
        if fmt != "plain":
            if block is None:
                other.append(f"{key}: stored as {info.dtype} but config.json has no quantization_config")
                continue
            if sk is None:
                missing.append(f"{key[:-len('.weight')]}.scale (scale of the {fmt.upper()} weight {key})")
                continue
            scale = table[sk]
            used.add(sk)
            gwant = (fp8mod.scale_grid_shape(tuple(info.shape), block) if fmt == "fp8"
                     else (*info.shape[:-1], math.ceil(info.shape[-1] * 2 / FP4_BLOCK)))
            if tuple(scale.shape) != tuple(gwant):
                mismatched.append(f"{sk}: expected {list(gwant)} vs found {list(scale.shape)}")
                continue
        prev = covered.setdefault(slot.target, {})
        whole = Slot(slot.target)
        clash = prev.get(slot) or prev.get(whole)
        if clash is None and slot == whole and prev:
            clash = next(iter(prev.values()))
        if clash:
            other.append(f"{key}: writes {slot.target} already written by {clash}")
            continue
        prev[slot] = key
        reads.append((info, slot, scale, fmt))
    for sk in sorted(scales - used):
        (report.ignored if ignored(sk) else unexpected).append(sk)
    for name, shape in shapes.items():
        got_slots = covered.get(name, {})
        if Slot(name) in got_slots:
            continue
        need = v4_target_keys(name, shape, "native")
        lacking = [k for k, s in need if s not in got_slots]
        if not lacking:
            continue
        if ignored(name) or all(ignored(k) for k in lacking):
            report.zero_filled.append(name)
            continue
        missing.extend(f"{k} (-> {name})" for k in lacking[:4])
        if len(lacking) > 4:
            missing.append(f"... {len(lacking) - 4} more parts of {name}")
    if missing or unexpected or mismatched or other:
        raise LoadError(path, missing, unexpected, mismatched, other)
    report.scales = len(used)
    return reads, report


def load_v4_into(model: nn.Module, path: str | Path, cfg: ModelConfig, hf: dict[str, Any],
                 table: dict[str, TensorInfo], *, ignore: Iterable[str] = ()) -> LoadReport:
    """Strictly load a V4 checkpoint (any of the accepted spellings, FP8/FP4 or plain) into ``model``."""
    qc = hf.get("quantization_config") or None
    block = tuple(qc.get("weight_block_size", (128, 128))) if qc else None
    targets = model_targets(model)
    reads, report = plan_v4(target_shapes(targets), table,
                            block=block, ignore=ignore, path=str(path))
    with torch.no_grad():
        for name in report.zero_filled:
            targets[name].zero_()
        handles: dict[Path, Any] = {}
        try:
            for info, slot, scale, fmt in sorted(reads, key=lambda r: (str(r[0].file), r[0].start)):
                fh = handles.get(info.file)
                if fh is None:
                    fh = handles[info.file] = open(info.file, "rb", buffering=0)  # noqa: SIM115
                dst = slot.view(targets[slot.target])
                t = read_tensor(info, fh)
                if fmt == "fp8":
                    assert block is not None
                    t = fp8mod.dequantize(t, read_tensor(scale, fh), block, out_dtype=torch.float32)
                elif fmt == "fp4":
                    t = dequantize_fp4(t, read_tensor(scale, fh))
                if fmt != "plain":
                    report.dequantized += 1
                dst.copy_(t)
                report.tensors_read += 1
                report.bytes_read += info.end - info.start + (scale.end - scale.start if scale else 0)
        finally:
            for fh in handles.values():
                fh.close()
    return report


# ------------------------------------------------------------------------------------------------
# saving


def v4_tensors(model: nn.Module, layout: str = "transformers") -> list[tuple[str, torch.Tensor]]:
    """(checkpoint key, tensor view) of every parameter and persistent buffer, in ``layout``."""
    if layout not in ("native", "transformers"):
        raise ValueError(f"layout={layout!r} must be 'native' or 'transformers'")
    out = []
    for name, t in model_targets(model).items():
        for key, slot in v4_target_keys(name, tuple(t.shape), layout):
            out.append((key, slot.view(t.detach())))
    return out


__all__ = ["dequantize_fp4", "is_v4_config", "load_v4_into", "plan_v4", "quantize_fp4", "save_v4",
           "v4_config_from_hf", "v4_config_to_hf", "v4_source_slot", "v4_target_keys", "v4_tensors"]


def save_v4(model: nn.Module, path: str | Path, *, layout: str = "transformers",
            max_shard_size: int | str = "5GB", tokenizer: Any = None) -> Path:
    """Write a V4 model as a checkpoint directory in ``layout`` (see the module docstring)."""
    import json

    from widemoe.hf.saver import Pending, _dtype_name, write_sharded, write_tokenizer

    cfg = model.config  # type: ignore[attr-defined]
    path = Path(path)
    hf = v4_config_to_hf(cfg, dtype=_dtype_name(model), layout=layout)
    write_sharded(path, [Pending.of(k, t) for k, t in v4_tensors(model, layout)], max_shard_size)
    (path / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if getattr(cfg, k) is not None}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tok is not None:
        write_tokenizer(tok, path, cfg)
    return path
