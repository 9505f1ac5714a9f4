"""config.json fields shared by the transformers-convention families (DeepSeek-V2/V3, Kimi K2,
Qwen3-MoE, Mixtral, OLMoE): the reader that tracks used fields and refuses what widemoe cannot run,
the RoPE forms, the core header, and the ``widemoe`` block that round-trips widemoe-only fields.

The semantics follow transformers 5.24's configuration classes (our parity reference). RoPE comes in
the legacy form (``rope_theta`` + ``rope_scaling``) and the v5 form (``rope_parameters``); both are
read, the v5 form is written (the legacy keys are added by `FamilyAdapter.config_file`).
Nothing in a config is ever executed (``auto_map`` is ignored with a notice).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from widemoe.config import ConfigError, ModelConfig, check_field_value, config_source
from widemoe.config_types import Kind, check_value, is_finite_number

_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}

# Fields that never change the forward pass (or that widemoe reads elsewhere): ignored silently.
IGNORED = {
    "_name_or_path", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype",
    "use_cache", "output_attentions", "output_hidden_states", "output_router_logits", "return_dict",
    "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
    "pretraining_tp", "auto_map", "quantization_config", "initializer_range", "tie_word_embeddings",
    "head_dim", "qk_head_dim", "ep_size", "seq_aux", "num_key_value_heads", "widemoe", "rope_theta",
    "rope_scaling", "rope_parameters", "generation_config", "tokenizer_class", "attention_dropout",
    "sliding_window", "use_sliding_window", "max_window_layers", "num_local_experts", "num_experts",
    "n_routed_experts", "num_mtp_layers", "bos_token_id", "eos_token_id", "pad_token_id", "vocab_size",
    "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings", "rms_norm_eps",
    "hidden_act",
}  # fmt: skip
# widemoe-only fields round-trip through a "widemoe" block of config.json.
WIDEMOE_ONLY = (
    "capacity_factor",
    "bias_update_speed",
    "mtp_loss_weight",
    "router_z_loss_coef",
    "aux_loss_alpha",
    "router_aux_loss_coef",
)
_YARN_KEYS = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")


class HfFields:
    """One config.json being read: the family's transformers defaults for absent fields, the set of
    fields used (the rest are reported), notices, and refusals that name the field."""

    def __init__(self, hf: dict[str, Any], family: str, defaults: dict[str, Any], source: str) -> None:
        self.hf, self.family, self.defaults, self.source = hf, family, defaults, source
        self.used: set[str] = {"auto_map", "trust_remote_code"}
        self.notices: list[str] = []

    def get(self, key: str, *alts: str, required: bool = False) -> Any:
        for k in (key, *alts):
            if k in self.hf and (self.hf[k] is not None or not required):
                self.used.add(k)
                return self.typed(key, self.hf[k], k)
        if required:
            if self.hf.get(key, 0) is None and key in _FIELDS:  # present as null: the typed message
                check_field_value(key, None, source=self.source)
            raise ConfigError(f"{self.source}: required field {key!r} is missing or null ({self.family})")
        return self.defaults.get(key)

    def typed(self, field: str, value: Any, key: str | None = None) -> Any:
        """`value` unchanged once it has the type of ModelConfig's `field` (checked before an adapter
        converts it: ``bool("false")`` is True); null is left to the caller (often "the default")."""
        if value is None or field not in _FIELDS or (field == "eos_token_id" and isinstance(value, list)):
            return value
        check_field_value(field, value, key=key or field, source=self.source)
        return value

    def raw(self, key: str, base: type, default: Any = None) -> Any:
        """config.json's `key`, read as it is (no ModelConfig field, or one the family refuses or
        ignores), checked to be a `base` (bool, int or float) or null; `default` when absent or null."""
        self.used.add(key)
        v = check_raw(key, self.hf.get(key), base, self.source)
        return default if v is None else v

    def seen(self, *keys: str) -> None:
        """Mark fields as read (checked by the caller without `get`)."""
        self.used.update(keys)

    def refuse(self, cond: bool, msg: str) -> None:
        if cond:
            raise ConfigError(f"{self.source}: {msg}")

    def widemoe_block(self) -> dict[str, Any]:
        """config.json's ``widemoe`` block (widemoe-only fields), {} when absent; refused unless a mapping."""
        block = self.hf.get("widemoe")
        if block is None:
            return {}
        self.refuse(not isinstance(block, dict),
                    f"widemoe={block!r} must be an object (a mapping of widemoe-only fields)")
        return block


def check_raw(key: str, value: Any, base: type, source: str, item: type | None = None) -> Any:
    """`value` of config.json's `key` when it is a `base` (bool, int, float; tuple of `item`: a list) or
    null, normalised (ints become floats where floats belong); else ConfigError naming the key, the
    value and the expected type."""
    checked, error = check_value(key, Kind(base, item=item, optional=True), value)
    if error is not None:
        raise ConfigError(f"{source}: {error}")
    return checked


def check_mapping(key: str, value: Any, source: str) -> dict[str, Any]:
    """config.json's `key` when it is an object (null: empty); else ConfigError naming key and value."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key}={value!r} must be an object (a JSON mapping) or null")
    return value


def read_core(r: HfFields) -> dict[str, Any]:
    """The fields every family shares (sizes, norms, token ids, RoPE) as ModelConfig keywords."""
    hf = r.hf
    if hf.get("auto_map") or hf.get("trust_remote_code"):
        r.notices.append(
            "auto_map / remote code in config.json ignored: widemoe never executes code from a model "
            f"directory and runs its own {r.family} implementation"
        )
    act = r.get("hidden_act") or "silu"
    r.refuse(act != "silu", f"hidden_act={act!r} is not supported (only 'silu' SwiGLU)")
    drop = r.raw("attention_dropout", float, 0.0)
    r.refuse(drop != 0, f"attention_dropout={drop} is not supported (widemoe has no attention dropout)")
    eos = r.get("eos_token_id")
    tie, init = r.get("tie_word_embeddings"), r.get("initializer_range")
    if isinstance(eos, list):
        r.notices.append(f"eos_token_id={eos} is a list; widemoe uses the first id {eos[0] if eos else None}")
        eos = eos[0] if eos else None
    c: dict[str, Any] = dict(
        model_type=r.family,
        vocab_size=r.get("vocab_size", required=True),
        hidden_size=r.get("hidden_size", required=True),
        num_hidden_layers=r.get("num_hidden_layers", required=True),
        num_attention_heads=r.get("num_attention_heads", required=True),
        max_position_embeddings=r.get("max_position_embeddings"),
        rms_norm_eps=_real(r.get("rms_norm_eps"), float),
        tie_word_embeddings=False if tie is None else tie,
        initializer_range=0.02 if init is None else _real(init, float),
        bos_token_id=r.get("bos_token_id"),
        eos_token_id=eos,
        pad_token_id=r.get("pad_token_id"),
    )
    theta, rope_scaling = _rope_from_hf(r, c["max_position_embeddings"])
    c.update(rope_theta=theta, rope_scaling=rope_scaling)
    return c


def _real(v: Any, cast: type) -> Any:
    """`cast(v)` for a finite number; anything else as it is, for ModelConfig to refuse by name."""
    return cast(v) if is_finite_number(v) else v


def _rope_from_hf(r: HfFields, max_pos: int) -> tuple[float, dict | None]:
    """(rope_theta, widemoe rope_scaling) from either the legacy or the v5 form."""
    hf, source = r.hf, r.source
    params = check_mapping("rope_parameters", hf.get("rope_parameters"), source)
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ConfigError(
            f"{source}: rope_parameters is nested per layer type; widemoe uses one RoPE for all layers"
        )
    rp: dict[str, Any] = {**check_mapping("rope_scaling", hf.get("rope_scaling"), source), **params}
    theta = rp.get("rope_theta", hf.get("rope_theta", r.defaults["rope_theta"]))
    kind = rp.get("rope_type", rp.get("type", "default"))
    prf = check_raw("partial_rotary_factor", rp.get("partial_rotary_factor", hf.get("partial_rotary_factor")),
                    float, source)
    r.refuse(
        prf not in (None, 1, 1.0),
        f"partial_rotary_factor={prf} is not supported (widemoe rotates the whole rope dimension)",
    )
    theta = r.typed("rope_theta", theta)
    if kind == "default":
        return _real(theta, float), None
    r.refuse(
        kind != "yarn",
        f"rope type {kind!r} (rope_scaling/rope_parameters) is not supported; "
        "widemoe runs 'default' and 'yarn'",
    )
    L0 = rp.get("original_max_position_embeddings", hf.get("original_max_position_embeddings", max_pos))
    factor = rp.get("factor")
    if factor is None and is_finite_number(max_pos) and is_finite_number(L0) and L0 > 0:
        factor = max_pos / L0  # transformers: the ratio of the extended to the original context
    # Keep exactly the keys the file sets: transformers' defaults depend on absence (e.g. the
    # attention factor is mscale(s, mscale)/mscale(s, mscale_all_dim) only when both are set), and
    # widemoe.model.layers mirrors that logic, including attention_factor and truncate.
    rs: dict[str, Any] = {
        "type": "yarn",
        "factor": _real(factor, float),
        "original_max_position_embeddings": int(L0) if is_finite_number(L0) and L0 == int(L0) else L0,
    }
    rs.update({k: rp[k] for k in _YARN_KEYS if rp.get(k) is not None})
    return _real(theta, float), rs


def finish(r: HfFields, c: dict[str, Any], *, handled: tuple[str, ...] = ()) -> tuple[ModelConfig, list[str]]:
    """The ModelConfig: widemoe-only fields from the ``widemoe`` block (keys in ``handled`` were read
    by the family), then a notice listing the config.json fields nobody used."""
    for k, v in r.widemoe_block().items():
        if k in WIDEMOE_ONLY:
            c[k] = v
        elif k not in handled:
            r.notices.append(f"widemoe.{k} in config.json is not a widemoe-only field; ignored")
    unknown = sorted(set(r.hf) - r.used - IGNORED - set(c))
    if unknown:
        r.notices.append(f"config fields not used by widemoe: {', '.join(unknown)}")
    with config_source(r.source):
        return ModelConfig(**c), r.notices


# ------------------------------------------------------------------------------------------------
# ModelConfig -> config.json


def requirement(family: str) -> Callable[[bool, str], None]:
    """``need(ok, msg)``: ConfigError naming what the ``family`` config.json cannot express."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(f"cannot write a {family} config.json: {msg}")

    return need


def core_to_hf(
    cfg: ModelConfig, family: str, architecture: str, dtype: str | None, *, dense_list: bool = False
) -> dict[str, Any]:
    """The shared config.json fields (sizes, norms, token ids, v5 ``rope_parameters``, dtype).
    ``dense_list``: the family has a list of dense layers (``mlp_only_layers``)."""
    need = requirement(family)
    d: dict[str, Any] = dict(
        architectures=[architecture],
        model_type=family,
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
        extra = {k: v for k, v in cfg.rope_scaling.items() if k not in ("type", "rope_type")}
        rp = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, **extra}
    d["rope_parameters"] = rp
    if dtype is not None:
        d["dtype"] = dtype
    need(
        cfg.mlp_only_layers == () or dense_list,
        f"mlp_only_layers={list(cfg.mlp_only_layers)} exists only in qwen3_moe configs",
    )
    return d


def widemoe_block(cfg: ModelConfig) -> dict[str, Any]:
    """The widemoe-only fields that differ from their defaults (config.json's ``widemoe`` block)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    return {k: getattr(cfg, k) for k in WIDEMOE_ONLY if getattr(cfg, k) != defaults[k]}


__all__ = [
    "HfFields",
    "IGNORED",
    "WIDEMOE_ONLY",
    "core_to_hf",
    "finish",
    "read_core",
    "requirement",
    "check_raw",
    "widemoe_block",
]
