"""ModelConfig: one frozen dataclass describing every model family widemoe builds.

Field names are the Hugging Face config.json names of the families (DeepSeek-V3, Kimi K2,
DeepSeek-V2, Qwen3-MoE, Mixtral, OLMoE), so importing and exporting configs is a thin mapping and
users recognise every field. A family is a configuration, not a copy of the model code: router
scoring, normalisation, scaling, grouping, attention type and norms are all fields here.

Fields that no HF family defines (balancing and training switches) are marked "widemoe" below.

Validation runs when the dataclass is built (also through `dataclasses.replace`): first one type pass
over every field (`widemoe.config_types`, from the annotations: ``norm_topk_prob='false' must be a
boolean (true or false), not a string``), then the value rules. Every error names the field and the
rule it breaks, e.g. ``num_experts_per_tok=20 exceeds n_routed_experts=16``, after the source:
``ModelConfig:`` when built directly, the file's path when read from one.

The presets (published dimensions of real releases, and the small CPU sizes) are in
`widemoe.presets`, one layer up: `widemoe.presets.config_from_file` reads a config file that starts
from a preset. Per-family rules (fields only one family reads) are picked from `FAMILY_RULES`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from widemoe.config_types import check_value, is_finite_number, is_integer, kinds_of

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser as the `tomli` package (a dependency there, see pyproject.toml)
    import tomli as tomllib

SCORING_FUNCS = ("sigmoid", "softmax", "sqrtsoftplus")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
QK_NORMS = ("none", "head", "full")
ROPE_TYPES = ("default", "yarn")
V4_LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")


class ConfigError(ValueError):
    """An invalid model configuration: the message names the field and the rule."""


@dataclass(frozen=True)
class ModelConfig:
    # --- identity --------------------------------------------------------------------------
    model_type: str = "deepseek_v3"  # HF family tag; widemoe-native models use deepseek_v3

    # --- sizes -------------------------------------------------------------------------------
    vocab_size: int = 256
    hidden_size: int = 64
    num_hidden_layers: int = 2
    intermediate_size: int = 128  # dense SwiGLU width (first_k_dense_replace layers)
    moe_intermediate_size: int = 32  # width of one routed expert
    hidden_act: str = "silu"

    # --- mixture of experts ----------------------------------------------------------------
    n_routed_experts: int = 8
    n_shared_experts: int = 0  # one fused SwiGLU of width n_shared_experts * moe_intermediate_size
    num_experts_per_tok: int = 2
    first_k_dense_replace: int = 0  # layers [0, k) use the dense SwiGLU
    mlp_only_layers: tuple[int, ...] = ()  # Qwen3-MoE: explicit dense layers
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"
    # noaux_tc: selection bias + top-2-sum groups; greedy; group_limited_greedy (max)
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    # widemoe: Switch/GShard capacity; None = dropless (the default). Never drops in eval.
    capacity_factor: float | None = None

    # --- balancing (coefficients of the losses added to the LM loss; 0 disables) -------------
    aux_loss_alpha: float = 0.0  # DeepSeek sequence-wise balance loss (HF name; paper-V3 uses 1e-4)
    router_aux_loss_coef: float = 0.0  # Switch-style load-balancing loss (HF name)
    router_z_loss_coef: float = 0.0  # router z-loss (OLMoE name)
    bias_update_speed: float = 1e-3  # widemoe: aux-loss-free bias step u (noaux_tc routers only)

    # --- attention ---------------------------------------------------------------------------
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # GQA; None = num_attention_heads
    head_dim: int | None = None  # GQA head width; None = hidden_size // num_attention_heads
    q_lora_rank: int | None = None  # MLA low-rank query path; None = one q_proj
    kv_lora_rank: int | None = None  # MLA latent width; None = GQA attention
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    qk_norm: str = "none"  # none | head (Qwen3: per head) | full (OLMoE: over all heads)
    attention_bias: bool = False

    # --- positions ---------------------------------------------------------------------------
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "yarn", "factor", "original_max_position_…", …}
    rope_interleave: bool = True  # DeepSeek: interleaved pairs; Qwen/Mixtral/OLMoE: rotate-half
    max_position_embeddings: int = 4096

    # --- heads, norms, misc ------------------------------------------------------------------
    num_nextn_predict_layers: int = 0  # MTP modules
    mtp_loss_weight: float = 0.3  # widemoe: lambda of the MTP loss (paper-V3: 0.3, then 0.1)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None

    # --- DeepSeek-V4 (read only when model_type == "deepseek_v4"; HF DeepseekV4Config names) ----
    # V4 reuses head_dim (the one shared K=V head and every query head), qk_rope_head_dim (the rope
    # slice at the END of each head), q_lora_rank, rope_theta ("main" rope) and rope_scaling (YaRN of
    # the "compress" rope only). shared/reference/deepseek_v4.md documents every field.
    layer_types: tuple[str, ...] = ()  # per layer, one of V4_LAYER_TYPES; () = HF's default schedule
    compress_rate_csa: int = 4  # m: CSA window (overlapping windows, lightning indexer)
    compress_rate_hca: int = 128  # m': HCA window (dense over compressed entries)
    compress_rope_theta: float = 160000.0  # base of the "compress" rope (CSA/HCA, compressors, indexer)
    sliding_window: int | None = None  # W: every V4 layer attends to its last W tokens (self included)
    hc_mult: int = 4  # n residual streams of the manifold-constrained hyper-connections
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    o_groups: int = 8  # g groups of the grouped low-rank output projection
    o_lora_rank: int = 1024  # per-group width of that projection
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    num_hash_layers: int = 0  # the first layers route by tid2eid[token id] (hash MoE)
    swiglu_limit: float | None = None  # SwiGLU clamp: gate <= limit, |up| <= limit (routed and shared)
    index_loss_coef: float = 0.0  # widemoe: weight of the lightning indexer's own KL objective (training)

    # ------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        try:
            for name, kind in _KINDS.items():  # the type pass: lists -> tuples, ints -> floats
                value, error = check_value(name, kind, getattr(self, name))
                _need(error is None, error or "")
                object.__setattr__(self, name, value)
            _validate(self)
        except ConfigError as e:
            raise ConfigError(f"ModelConfig: {e}") from None

    # --- derived properties --------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head (MLA: nope + rope)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.gqa_head_dim

    @property
    def rope_dim(self) -> int:
        """Channels that RoPE rotates per head."""
        return self.qk_rope_head_dim if self.is_mla else self.gqa_head_dim

    @property
    def uses_selection_bias(self) -> bool:
        """Routers with an e_score_correction_bias (aux-loss-free balancing)."""
        return self.topk_method == "noaux_tc"

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and layer_idx not in self.mlp_only_layers

    @property
    def moe_layer_indices(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def yarn(self) -> dict[str, Any] | None:
        rs = self.rope_scaling
        if rs and (rs.get("type") or rs.get("rope_type")) == "yarn":
            return rs
        return None

    # --- construction helpers ------------------------------------------------------------------
    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed; validated like any other config."""
        check_known_fields(changes, "replace()")
        return dataclasses.replace(self, **changes)

    @property
    def v4_layer_types(self) -> tuple[str, ...]:
        """V4 attention type per layer; an empty `layer_types` means HF's default schedule
        (HCA, HCA, then CSA on odd / HCA on even indices of the rest)."""
        if self.layer_types:
            return self.layer_types
        n = self.num_hidden_layers
        rest = [V4_LAYER_TYPES[1] if i % 2 else V4_LAYER_TYPES[2] for i in range(max(n - 2, 0))]
        return tuple([V4_LAYER_TYPES[2]] * min(n, 2) + rest)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        d["layer_types"] = list(self.layer_types)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> ModelConfig:
        """Build from widemoe's own field names; unknown keys are an error naming them."""
        check_known_fields(d, source)
        with config_source(source):
            return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path, presets: PresetLookup | None = None) -> ModelConfig:
        """Read a widemoe config from JSON or TOML. A `preset` key starts from `presets(name)`;
        `widemoe.presets.config_from_file` passes the preset table (config.py sits below presets.py)."""
        p = Path(path)
        d = read_config_mapping(p)
        if "preset" not in d:
            return cls.from_dict(d, source=str(p))
        base = d.pop("preset")
        _need(isinstance(base, str), f"{p}: preset={base!r} must be a string (a preset name)")
        _need(presets is not None, f"{p}: 'preset' = {base!r} needs the preset table; "
              "read the file with widemoe.presets.config_from_file")
        check_known_fields(d, str(p))
        with config_source(str(p)):
            return presets(base).replace(**d)


_KINDS = kinds_of(ModelConfig)  # field -> expected type, from the annotations above
PresetLookup = Callable[[str], ModelConfig]  # name -> config (widemoe.presets.get_preset)


def read_config_mapping(p: Path) -> dict[str, Any]:
    """The top-level mapping of a JSON or TOML config file; any read or parse error names the file."""
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file ({e.strerror})") from None
    try:
        d = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error becomes a ConfigError naming the file
        raise ConfigError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: expected a mapping of config fields at the top level")
    return d


@contextlib.contextmanager
def config_source(source: str) -> Iterator[None]:
    """Name `source` (a file, a preset) instead of ``ModelConfig`` in the errors of configs built inside."""
    try:
        yield
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(f"{source}: {msg.removeprefix('ModelConfig: ')}") from None


def check_field_value(field: str, value: Any, *, key: str | None = None, source: str = "ModelConfig") -> Any:
    """`value` checked against the type of ModelConfig's `field` and normalised (ints -> floats where
    floats belong, lists -> tuples); ConfigError names the source, the key (default: the field), the
    value and the expected type. For readers that convert values before building the config."""
    checked, error = check_value(key or field, _KINDS[field], value)
    if error is not None:
        raise ConfigError(f"{source}: {error}")
    return checked


def check_known_fields(d: dict[str, Any], source: str) -> None:
    """Refuse keys that are not ModelConfig fields, naming them and where they came from."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(
            f"{source}: unknown config field(s) {unknown}; known fields are listed in widemoe.config"
        )


# --- validation: generic rules, then the rules of the config's family ---------------------------------


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _need_ints(c: ModelConfig, names: tuple[str, ...], minimum: int) -> None:
    """Each named field is an int >= minimum (1: positive, 0: non-negative)."""
    rule = "a positive integer" if minimum == 1 else "a non-negative integer"
    for name in names:
        v = getattr(c, name)
        _need(isinstance(v, int) and v >= minimum, f"{name}={v!r} must be {rule}")


def _validate(c: ModelConfig) -> None:
    _validate_sizes(c)
    if c.moe_layer_indices:
        _validate_moe(c)
    _validate_routing(c)
    _validate_attention(c)
    _validate_rope(c)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(c, name)
        _need(
            v is None or (isinstance(v, int) and 0 <= v < c.vocab_size),
            f"{name}={v!r} must be null or a token id in [0, vocab_size={c.vocab_size})",
        )
    FAMILY_RULES.get(c.model_type, _validate_standard_family)(c)


def _validate_sizes(c: ModelConfig) -> None:
    _need_ints(c, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"), 1)
    _need_ints(c, ("max_position_embeddings",), 1)
    counts = ("intermediate_size", "moe_intermediate_size", "n_routed_experts", "n_shared_experts",
              "num_experts_per_tok", "first_k_dense_replace", "num_nextn_predict_layers")
    _need_ints(c, counts, 0)
    _need(c.hidden_act == "silu", f"hidden_act={c.hidden_act!r} is not supported (only 'silu' SwiGLU)")
    _need(
        c.first_k_dense_replace <= c.num_hidden_layers,
        f"first_k_dense_replace={c.first_k_dense_replace} exceeds num_hidden_layers={c.num_hidden_layers}",
    )
    for i in c.mlp_only_layers:
        _need(
            0 <= i < c.num_hidden_layers,
            f"mlp_only_layers contains {i}, outside [0, num_hidden_layers={c.num_hidden_layers})",
        )
    if any(not c.is_moe_layer(i) for i in range(c.num_hidden_layers)):
        _need(
            c.intermediate_size > 0,
            "intermediate_size must be > 0 when a dense layer exists "
            f"(first_k_dense_replace={c.first_k_dense_replace}, mlp_only_layers={list(c.mlp_only_layers)})",
        )


def _validate_moe(c: ModelConfig) -> None:
    """Expert counts and groups of a model with MoE layers."""
    E, k = c.n_routed_experts, c.num_experts_per_tok
    _need(E >= 1, f"n_routed_experts={E} must be >= 1 when the model has MoE layers")
    _need(c.moe_intermediate_size > 0, f"moe_intermediate_size={c.moe_intermediate_size} must be > 0")
    _need(k >= 1, f"num_experts_per_tok={k} must be >= 1")
    _need(k <= E, f"num_experts_per_tok={k} exceeds n_routed_experts={E}")
    _need(c.n_group >= 1, f"n_group={c.n_group} must be >= 1")
    _need(E % c.n_group == 0, f"n_routed_experts={E} is not divisible by n_group={c.n_group}")
    _need(1 <= c.topk_group <= c.n_group, f"topk_group={c.topk_group} must be in [1, n_group={c.n_group}]")
    per_group = E // c.n_group
    _need(
        k <= c.topk_group * per_group,
        f"num_experts_per_tok={k} exceeds topk_group*experts_per_group={c.topk_group}*{per_group}: "
        "the kept groups cannot supply that many experts",
    )
    if c.n_group > 1 and c.topk_method == "noaux_tc":
        _need(
            per_group >= 2,
            f"n_routed_experts/n_group={per_group} must be >= 2: "
            "group scores are the sum of each group's top-2 experts",
        )


def _validate_routing(c: ModelConfig) -> None:
    """Router switches and the loss coefficients."""
    _need(c.scoring_func in SCORING_FUNCS, f"scoring_func={c.scoring_func!r} must be one of {SCORING_FUNCS}")
    _need(c.topk_method in TOPK_METHODS, f"topk_method={c.topk_method!r} must be one of {TOPK_METHODS}")
    _need(c.routed_scaling_factor > 0, f"routed_scaling_factor={c.routed_scaling_factor} must be > 0")
    if c.capacity_factor is not None:
        _need(c.capacity_factor > 0, f"capacity_factor={c.capacity_factor} must be > 0 (or null: dropless)")
    for name in ("aux_loss_alpha", "router_aux_loss_coef", "router_z_loss_coef", "bias_update_speed",
                 "mtp_loss_weight"):
        v = getattr(c, name)
        _need(v >= 0, f"{name}={v!r} must be finite and >= 0")


def _validate_attention(c: ModelConfig) -> None:
    H = c.num_attention_heads
    if c.is_mla:
        _need(c.kv_lora_rank > 0, f"kv_lora_rank={c.kv_lora_rank} must be > 0 (or null for GQA attention)")
        _need(
            c.q_lora_rank is None or c.q_lora_rank > 0,
            f"q_lora_rank={c.q_lora_rank} must be > 0 or null (null = a single q_proj)",
        )
        _need(
            c.qk_rope_head_dim > 0 and c.qk_rope_head_dim % 2 == 0,
            f"qk_rope_head_dim={c.qk_rope_head_dim} must be a positive even number",
        )
        _need(c.qk_nope_head_dim >= 0, f"qk_nope_head_dim={c.qk_nope_head_dim} must be >= 0")
        _need(c.v_head_dim > 0, f"v_head_dim={c.v_head_dim} must be > 0")
    else:
        kvh = c.kv_heads
        _need(
            kvh >= 1 and H % kvh == 0,
            f"num_attention_heads={H} is not divisible by num_key_value_heads={kvh}",
        )
        hd = c.gqa_head_dim
        _need(hd > 0 and hd % 2 == 0, f"head_dim={hd} must be a positive even number (RoPE rotates pairs)")
        if c.head_dim is None:
            _need(
                c.hidden_size % H == 0,
                f"hidden_size={c.hidden_size} is not divisible by "
                f"num_attention_heads={H}; set head_dim explicitly",
            )
    _need(c.qk_norm in QK_NORMS, f"qk_norm={c.qk_norm!r} must be one of {QK_NORMS}")
    _need(c.rms_norm_eps > 0, f"rms_norm_eps={c.rms_norm_eps} must be > 0")


def _validate_rope(c: ModelConfig) -> None:
    _need(c.rope_theta > 0, f"rope_theta={c.rope_theta} must be > 0")
    rs = c.rope_scaling
    if rs is None:
        return
    _need(isinstance(rs, dict), f"rope_scaling={rs!r} must be a mapping or null")
    kind = rs.get("type", rs.get("rope_type"))
    _need(kind in ROPE_TYPES, f"rope_scaling.type={kind!r} must be one of {ROPE_TYPES}")
    if kind != "yarn":
        return
    f = rs.get("factor")
    _need(is_finite_number(f) and f >= 1, f"rope_scaling.factor={f!r} must be a finite number >= 1 for YaRN")
    L0 = rs.get("original_max_position_embeddings")
    _need(
        is_integer(L0) and L0 > 0,
        f"rope_scaling.original_max_position_embeddings={L0!r} must be a positive integer for YaRN",
    )
    for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        v = rs.get(key)
        _need(
            v is None or (is_finite_number(v) and v >= 0),
            f"rope_scaling.{key}={v!r} must be a finite non-negative number",
        )


def _validate_standard_family(c: ModelConfig) -> None:
    """Families without blocks of their own must leave the switches that only such blocks read unset."""
    _need(not c.layer_types, f"layer_types={list(c.layer_types)} is only read by model_type='deepseek_v4'")
    _need(
        c.num_hash_layers == 0,
        f"num_hash_layers={c.num_hash_layers} is only read by "
        "model_type='deepseek_v4' (hash routing needs the V4 router)",
    )


def _validate_deepseek_v4(c: ModelConfig) -> None:
    """Rules of the DeepSeek-V4 fields (shared/reference/deepseek_v4.md)."""
    L = c.num_hidden_layers
    if c.layer_types:
        _need(
            len(c.layer_types) == L,
            f"layer_types has {len(c.layer_types)} entries; the rule is one per "
            f"layer (num_hidden_layers={L})",
        )
        bad = sorted({t for t in c.layer_types if t not in V4_LAYER_TYPES})
        _need(not bad, f"layer_types contains {bad}; each entry must be one of {V4_LAYER_TYPES}")
    _need(not c.is_mla, f"kv_lora_rank={c.kv_lora_rank} must be null for deepseek_v4 (one shared K=V head)")
    _need(c.kv_heads == 1, f"num_key_value_heads={c.num_key_value_heads} must be 1 for deepseek_v4")
    d, r = c.gqa_head_dim, c.qk_rope_head_dim
    _need(
        r > 0 and r % 2 == 0 and r <= d,
        f"qk_rope_head_dim={r} must be a positive even number <= head_dim={d} (the rope slice of a head)",
    )
    _need(
        c.q_lora_rank is not None and c.q_lora_rank > 0,
        f"q_lora_rank={c.q_lora_rank} must be > 0 for deepseek_v4 (low-rank queries feed the indexer)",
    )
    _need(
        c.o_groups >= 1 and (c.num_attention_heads * d) % c.o_groups == 0,
        f"o_groups={c.o_groups} must divide num_attention_heads*head_dim={c.num_attention_heads * d}",
    )
    sizes = ("o_lora_rank", "hc_mult", "hc_sinkhorn_iters", "index_n_heads", "index_topk",
             "compress_rate_csa", "compress_rate_hca")
    _need_ints(c, sizes, 1)
    _need(
        c.sliding_window is not None and c.sliding_window >= 1,
        f"sliding_window={c.sliding_window!r} must be a positive integer for deepseek_v4 "
        "(every layer has one)",
    )
    _need(
        c.index_head_dim >= r and c.index_head_dim % 2 == 0,
        f"index_head_dim={c.index_head_dim} must be even and >= qk_rope_head_dim={r}",
    )
    _need(0 <= c.num_hash_layers <= L, f"num_hash_layers={c.num_hash_layers} must be in [0, {L}]")
    _need(
        c.first_k_dense_replace == 0 and not c.mlp_only_layers,
        "deepseek_v4 has no dense layers: first_k_dense_replace must be 0 and mlp_only_layers empty",
    )
    _need(c.n_shared_experts <= 1, f"n_shared_experts={c.n_shared_experts} must be 0 or 1 for deepseek_v4")
    _need(c.swiglu_limit is None or c.swiglu_limit > 0, f"swiglu_limit={c.swiglu_limit} must be > 0 or null")
    _need(c.hc_eps > 0, f"hc_eps={c.hc_eps} must be > 0")
    _need(c.compress_rope_theta > 0, f"compress_rope_theta={c.compress_rope_theta} must be > 0")
    _need(c.index_loss_coef >= 0, f"index_loss_coef={c.index_loss_coef} must be finite and >= 0")


# The rules of each family with fields of its own, by model_type; every other family gets
# `_validate_standard_family`. A family with new fields adds its validator here.
FAMILY_RULES: dict[str, Callable[[ModelConfig], None]] = {"deepseek_v4": _validate_deepseek_v4}

__all__ = ["ConfigError", "FAMILY_RULES", "ModelConfig", "PresetLookup", "check_field_value",
           "check_known_fields", "config_source", "read_config_mapping"]
