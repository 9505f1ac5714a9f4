"""Cost calculator: parameters, FLOPs, memory, KV cache and training cost of a ModelConfig.

Pure arithmetic on `ModelConfig` (no torch). Every count is closed-form and is checked in the tests
against the model itself: the parameter total equals `sum(p.numel())` of `WideMoeForCausalLM` built on
the meta device, the KV figure equals `KVCache.nbytes()` after generation, and the forward FLOPs
agree with `torch.utils.flop_counter.FlopCounterMode`.

Conventions (see docs/cost.md for the reasoning and the sources):
- *total* counts every parameter once (tied embeddings once); MTP modules are reported apart, and
  their embedding and head are shared with the main model (real DeepSeek checkpoints store
  redundant copies of both: `MTP_REDUNDANT_COPIES`). Persistent fp32 buffers (the router's
  `e_score_correction_bias`) are counted apart, never in the parameter total.
- *active per token* counts what one token touches in the main model: attention, dense FFNs, the
  K routed experts chosen out of E, the shared experts, the whole router, the norms, the head and,
  in the "with embedding" convention, the input embedding. MTP is excluded (inference drops it).
- *forward FLOPs per token* = 2 x the matmul parameters a token multiplies by (active params minus
  the input embedding, a lookup, and minus the norms) + the attention term: scores `2·H·d_qk·ctx`
  and values `2·H·d_v·ctx` per layer, where `ctx` is the number of keys a query sees. Under a causal
  kernel the mean over a sequence of T tokens is (T+1)/2 (`causal=True`, used for cost); a
  dense-mask implementation computes all T (`causal=False`). Elementwise work is not counted.
- *training FLOPs per token* = 3 x forward: the 6·N rule for the matmul part plus 3 x the attention
  term, plus the MTP modules when the model has them (they run during training).
- Context lengths use k = 1024 (128k = 131072, as model cards call 131072 "128K"); token and
  GPU-hour counts are decimal (14.8T = 14.8e12). See `parse_context` / `parse_amount`.

Shapes: D hidden, H heads, E routed experts, K experts per token, I expert width, V vocab.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from widemoe.config import ConfigError, ModelConfig
from widemoe.presets import PRESET_NAMES, get_preset


class CostError(ValueError):
    """Invalid input to the calculator (model spec, context, layout); the message names it."""


COMPONENTS = ("embedding", "attention", "dense_ffn", "routed_experts", "shared_experts", "router",
              "norms", "head")
# Components whose weights are linear layers that FP8/FP4 checkpoints quantise (DeepSeek-V3's FP8
# checkpoint keeps the embedding, head, norms and router in bf16).
QUANTISED = ("attention", "dense_ffn", "routed_experts", "shared_experts", "eh_proj")

# ----------------------------------------------------------------------------------------------
# parsing


_BINARY = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_DECIMAL = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15}


def _parse(text: str | int | float, units: dict[str, float], what: str) -> float:
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([-+]?\d+(?:\.\d*)?(?:e[-+]?\d+)?)\s*([a-zA-Z]?)\s*", str(text))
        if not m or m.group(2).lower() not in units:
            raise CostError(f"{what}={text!r} is not a number with an optional suffix "
                            f"({'/'.join(u for u in units if u)})")
        value = float(m.group(1)) * units[m.group(2).lower()]
    if not math.isfinite(value) or value < 0:
        raise CostError(f"{what}={text!r} must be a non-negative number")
    return value


def parse_context(text: str | int, what: str = "context") -> int:
    """Token positions: '128k' = 131072, '1M' = 1048576 (k = 1024, as model cards use)."""
    value = _parse(text, _BINARY, what)
    if value != int(value):
        raise CostError(f"{what}={text!r} must be a whole number of tokens")
    return int(value)


def parse_amount(text: str | int | float, what: str = "amount") -> float:
    """Decimal amounts: '14.8T' tokens = 14.8e12, '2.788M' GPU-hours = 2.788e6, '37B' = 37e9."""
    return _parse(text, _DECIMAL, what)


# ----------------------------------------------------------------------------------------------
# loading a model spec: preset name, widemoe config file, or Hugging Face config.json / directory

def load_config(spec: str) -> ModelConfig:
    """MODEL argument: a preset name, a widemoe config file, a HF config.json, or a HF directory."""
    if spec in PRESET_NAMES:
        return get_preset(spec)
    p = Path(spec)
    if p.is_dir():
        p = p / "config.json"
        if not p.is_file():
            raise ConfigError(f"{spec}: directory has no config.json")
    elif not p.exists():
        raise ConfigError(f"unknown preset {spec!r} and no such file; presets: {', '.join(PRESET_NAMES)}")
    if p.suffix == ".toml":
        return ModelConfig.from_file(p)
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{p}: not a readable JSON config ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: expected a JSON object of config fields at the top level")
    if "preset" in d:
        return ModelConfig.from_file(p)
    if "architectures" in d or set(d) - _WIDEMOE_FIELDS:
        # the checkpoint loader's mapping (imports torch via widemoe.hf; the arithmetic here does not)
        from widemoe.hf.config_map import hf_to_model_config

        return hf_to_model_config(d, source=str(p))[0]
    # a widemoe file without a preset: its sizes must be stated, defaults would cost a toy model
    sizes = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in sizes if k not in d]
    if missing:
        raise ConfigError(f"{p}: missing required key(s) {missing} (or a 'preset' to start from)")
    return ModelConfig.from_file(p)


_WIDEMOE_FIELDS = set(ModelConfig.__dataclass_fields__)

# ----------------------------------------------------------------------------------------------
# parameter counts


def _swiglu(d: int, width: int) -> int:
    return 3 * d * width  # gate_proj, up_proj [width, d], down_proj [d, width]


def attention_weights(c: ModelConfig) -> int:
    """Projection weights (and biases) of one attention layer; its internal norms are in `layer_norms`."""
    D, H = c.hidden_size, c.num_attention_heads
    if c.is_mla:
        q_out = H * (c.qk_nope_head_dim + c.qk_rope_head_dim)
        q = D * q_out if c.q_lora_rank is None else D * c.q_lora_rank + c.q_lora_rank * q_out
        kv_a = D * (c.kv_lora_rank + c.qk_rope_head_dim)
        kv = kv_a + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
        return q + kv + H * c.v_head_dim * D
    hd, kvh = c.gqa_head_dim, c.kv_heads
    n = D * H * hd + 2 * D * kvh * hd + H * hd * D
    return n + _attention_biases(c)  # q, k, v and o biases when attention_bias is set


def _attention_biases(c: ModelConfig) -> int:
    if c.is_mla or not c.attention_bias:
        return 0
    return (c.num_attention_heads + 2 * c.kv_heads) * c.gqa_head_dim + c.hidden_size


def layer_norms(c: ModelConfig) -> int:
    """RMSNorm weights of one decoder layer: the two residual norms and those inside attention."""
    D = c.hidden_size
    n = 2 * D
    if c.is_mla:
        n += c.kv_lora_rank + (c.q_lora_rank or 0)
    elif c.qk_norm == "head":
        n += 2 * c.gqa_head_dim
    elif c.qk_norm == "full":
        n += (c.num_attention_heads + c.kv_heads) * c.gqa_head_dim
    return n


# --- DeepSeek-V4 (widemoe.model.deepseek_v4; shared/reference/deepseek_v4.md section 4) -------------
# Components: "attention" holds the attention projections, compressors, indexer and the per-layer
# hyper-connection (mHC) matrices; "norms" every RMSNorm weight; the additive vectors (sinks,
# compressor position biases, mHC bases and scales) are counted in `biases` (no matmul FLOPs).


def _v4_attention(c: ModelConfig, layer_type: str) -> tuple[int, int, int]:
    """(matmul weights, norm weights, additive vectors) of one V4 attention layer plus its two mHC sites."""
    D, H, d, q = c.hidden_size, c.num_attention_heads, c.gqa_head_dim, c.q_lora_rank
    g, o, n = c.o_groups, c.o_lora_rank, c.hc_mult
    mats = D * q + q * H * d + D * d + H * d * o + g * o * D
    norms, adds = q + d, H  # q_a_norm, kv_norm; sinks
    if layer_type == "compressed_sparse_attention":
        m, ci, Hi = c.compress_rate_csa, c.index_head_dim, c.index_n_heads
        mats += 4 * D * d + 4 * D * ci + q * Hi * ci + D * Hi
        norms += d + ci
        adds += m * 2 * d + m * 2 * ci
    elif layer_type == "heavily_compressed_attention":
        mats += 2 * D * d
        norms += d
        adds += c.compress_rate_hca * d
    mats += 2 * (2 + n) * n * n * D  # attn_hc.fn, ffn_hc.fn
    adds += 2 * ((2 + n) * n + 3)  # their base and scale
    return mats, norms, adds


def _v4_layer(c: ModelConfig, layer_type: str, active: bool) -> tuple[dict[str, int], int]:
    D, I = c.hidden_size, c.moe_intermediate_size
    out = dict.fromkeys(COMPONENTS, 0)
    mats, norms, adds = _v4_attention(c, layer_type)
    out["attention"] = mats + adds
    out["norms"] = norms + 2 * D
    out["routed_experts"] = (c.num_experts_per_tok if active else c.n_routed_experts) * _swiglu(D, I)
    out["shared_experts"] = _swiglu(D, c.n_shared_experts * I)
    out["router"] = c.n_routed_experts * D
    return out, adds


def _count_params_v4(c: ModelConfig) -> ParamCount:
    V, D, n = c.vocab_size, c.hidden_size, c.hc_mult
    total, active = dict.fromkeys(COMPONENTS, 0), dict.fromkeys(COMPONENTS, 0)
    for acc in (total, active):
        acc["embedding"] = V * D
        acc["head"] = 0 if c.tie_word_embeddings else V * D
        acc["norms"] = D
        acc["attention"] = n * n * D + n + 1  # hc_head
    biases = n + 1
    for t in c.v4_layer_types:
        layer, adds = _v4_layer(c, t, active=False)
        _add(total, layer)
        _add(active, _v4_layer(c, t, active=True)[0])
        biases += adds
    buffers = (c.num_hidden_layers - c.num_hash_layers) * c.n_routed_experts
    k = c.num_nextn_predict_layers
    mtp_total: dict[str, int] = dict.fromkeys((*COMPONENTS, "eh_proj"), 0)
    mtp_active: dict[str, int] = dict.fromkeys((*COMPONENTS, "eh_proj"), 0)
    mtp_biases = 0
    for _ in range(k):  # enorm, hnorm, e_proj, h_proj, a sliding-only block, hc_head, norm
        for acc, act in ((mtp_total, False), (mtp_active, True)):
            layer, adds = _v4_layer(c, "sliding_attention", act)
            _add(acc, layer)
            acc["norms"] += 3 * D
            acc["eh_proj"] += 2 * D * D
            acc["attention"] += n * n * D + n + 1
        mtp_biases += adds + n + 1
        buffers += c.n_routed_experts
    return ParamCount(total=total, active=active, mtp_total=mtp_total, mtp_active=mtp_active, buffers=buffers,
                      tied=c.tie_word_embeddings, mtp_modules=k, biases=biases, mtp_biases=mtp_biases)


def v4_kv_elements(c: ModelConfig, tokens: int) -> int:
    """Elements a V4 cache holds for one sequence of `tokens` positions (`V4Cache.nbytes()` / bytes):
    per layer the window min(tokens, W-1)·d, plus ⌊tokens/m⌋·(d + ci) per CSA layer (compressed
    entries and index keys) or ⌊tokens/m'⌋·d per HCA layer."""
    d, total = c.gqa_head_dim, 0
    for t in c.v4_layer_types:
        total += min(tokens, c.sliding_window - 1) * d
        if t == "compressed_sparse_attention":
            total += (tokens // c.compress_rate_csa) * (d + c.index_head_dim)
        elif t == "heavily_compressed_attention":
            total += (tokens // c.compress_rate_hca) * d
    return total


def v4_kv_growth_per_token(c: ModelConfig) -> float:
    """Elements added per token over all layers once the windows are full (Flash: 21·160 + 20·4)."""
    per = {"compressed_sparse_attention": (c.gqa_head_dim + c.index_head_dim) / c.compress_rate_csa,
           "heavily_compressed_attention": c.gqa_head_dim / c.compress_rate_hca, "sliding_attention": 0.0}
    return sum(per[t] for t in c.v4_layer_types)


def _layer(c: ModelConfig, moe: bool, active: bool) -> dict[str, int]:
    """Parameters of one decoder layer by component (`active`: routed experts scaled to K of E)."""
    D, I = c.hidden_size, c.moe_intermediate_size
    out = dict.fromkeys(COMPONENTS, 0)
    out["attention"] = attention_weights(c)
    out["norms"] = layer_norms(c)
    if moe:
        experts = c.num_experts_per_tok if active else c.n_routed_experts
        out["routed_experts"] = experts * _swiglu(D, I)
        out["shared_experts"] = _swiglu(D, c.n_shared_experts * I)
        out["router"] = c.n_routed_experts * D  # every token scores all E experts
    else:
        out["dense_ffn"] = _swiglu(D, c.intermediate_size)
    return out


def _add(a: dict[str, int], b: dict[str, int]) -> None:
    for k, v in b.items():
        a[k] = a.get(k, 0) + v


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts by component: `total`/`active` for the main model, `mtp_*` per all MTP modules."""

    total: dict[str, int]
    active: dict[str, int]
    mtp_total: dict[str, int]  # COMPONENTS + "eh_proj"; embedding/head are shared, so 0 there
    mtp_active: dict[str, int]
    buffers: int  # persistent fp32 e_score_correction_bias elements (main + MTP)
    tied: bool
    mtp_modules: int
    biases: int = 0  # attention biases in the main model (added, not multiplied: no matmul FLOPs)
    mtp_biases: int = 0

    @property
    def main_total(self) -> int:
        return sum(self.total.values())

    @property
    def mtp(self) -> int:
        return sum(self.mtp_total.values())

    @property
    def total_with_mtp(self) -> int:
        """What `sum(p.numel() for p in model.parameters())` gives for WideMoeForCausalLM."""
        return self.main_total + self.mtp

    @property
    def active_with_embedding(self) -> int:
        return sum(self.active.values())

    @property
    def active_without_embedding(self) -> int:
        """Active minus the input embedding (a lookup); tied weights stay, since the head uses them."""
        return self.active_with_embedding - (0 if self.tied else self.active["embedding"])

    @property
    def matmul_active(self) -> int:
        """Weights a token is multiplied by (the FLOPs base): no embedding lookup, no norms, head counted."""
        head = self.total["embedding"] if self.tied else self.active["head"]
        a = self.active
        return self.active_with_embedding - a["embedding"] - a["norms"] - a["head"] + head - self.biases

    @property
    def mtp_matmul_active(self) -> int:
        """Per all MTP modules: eh_proj, the block's matmuls and one pass through the shared head each."""
        n = self.mtp_active
        head = self.total["embedding" if self.tied else "head"]
        return sum(n.values()) - n["norms"] - self.mtp_biases + self.mtp_modules * head



def count_params(c: ModelConfig) -> ParamCount:
    """Closed-form parameter counts of `WideMoeForCausalLM(c)` (names in docs/internals.md)."""
    if c.is_v4:
        return _count_params_v4(c)
    V, D = c.vocab_size, c.hidden_size
    total, active = dict.fromkeys(COMPONENTS, 0), dict.fromkeys(COMPONENTS, 0)
    total["embedding"] = active["embedding"] = V * D
    total["head"] = active["head"] = 0 if c.tie_word_embeddings else V * D
    total["norms"] = active["norms"] = D  # final model.norm
    for i in range(c.num_hidden_layers):
        moe = c.is_moe_layer(i)
        _add(total, _layer(c, moe, active=False))
        _add(active, _layer(c, moe, active=True))
    moe_layers = len(c.moe_layer_indices)
    bias_per_moe = c.n_routed_experts if c.uses_selection_bias else 0
    buffers = moe_layers * bias_per_moe

    k = c.num_nextn_predict_layers
    mtp_moe = moe_layers > 0  # the MTP block is MoE unless the main model has no MoE layers
    mtp_total: dict[str, int] = dict.fromkeys((*COMPONENTS, "eh_proj"), 0)
    mtp_active: dict[str, int] = dict.fromkeys((*COMPONENTS, "eh_proj"), 0)
    for _ in range(k):
        for acc, act in ((mtp_total, False), (mtp_active, True)):
            _add(acc, _layer(c, mtp_moe, act))
            acc["norms"] += 3 * D  # enorm, hnorm, shared_head_norm
            acc["eh_proj"] += 2 * D * D
        if mtp_moe:
            buffers += bias_per_moe
    return ParamCount(total=total, active=active, mtp_total=mtp_total, mtp_active=mtp_active,
                      buffers=buffers, tied=c.tie_word_embeddings, mtp_modules=k,
                      biases=c.num_hidden_layers * _attention_biases(c), mtp_biases=k * _attention_biases(c))


# Real DeepSeek-V3/R1 checkpoints store, per MTP layer, copies of embed_tokens and shared_head.head
# (README_WEIGHTS: 671B main + 14B MTP = 685B on disk). widemoe shares them instead.
def mtp_redundant_copies(c: ModelConfig) -> int:
    return c.num_nextn_predict_layers * 2 * c.vocab_size * c.hidden_size


# ----------------------------------------------------------------------------------------------
# FLOPs


def attention_flops_per_token(c: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward attention FLOPs (scores + values) per token, all layers, for sequences of `seq_len` tokens."""
    if seq_len < 0:
        raise CostError(f"seq_len={seq_len} must be >= 0")
    H = c.num_attention_heads
    d_qk = c.qk_head_dim
    d_v = c.v_head_dim if c.is_mla else c.gqa_head_dim
    ctx = (seq_len + 1) / 2 if causal else seq_len
    if c.is_v4:
        return v4_attention_flops_at(c, ctx)
    return c.num_hidden_layers * 2 * H * (d_qk + d_v) * ctx


def v4_attention_flops_at(c: ModelConfig, ctx: float) -> float:
    """DeepSeek-V4 attention FLOPs of one query that sees `ctx` earlier tokens (all layers): scores and
    values over min(ctx, W) window keys plus min(index_topk, ctx/m) CSA or ctx/m' HCA entries, and the
    CSA indexer's scan of all ctx/m index keys (Hi·ci MACs each). Causal means use the mean context
    (T+1)/2, which is exact for the linear terms and close for the min() terms."""
    H, d = c.num_attention_heads, c.gqa_head_dim
    total = 0.0
    for t in c.v4_layer_types:
        keys = min(ctx, c.sliding_window)
        if t == "compressed_sparse_attention":
            entries = ctx / c.compress_rate_csa
            keys += min(c.index_topk, entries)
            total += 2 * c.index_n_heads * c.index_head_dim * entries
        elif t == "heavily_compressed_attention":
            keys += ctx / c.compress_rate_hca
        total += 2 * H * 2 * d * keys  # K = V: scores and values both over d channels
    return total


@dataclass(frozen=True)
class Flops:
    """FLOPs per token at a sequence length: forward and training, with the attention term apart."""

    seq_len: int
    forward_matmul: float  # 2·N_matmul
    forward_attention: float
    train_matmul: float  # 6·N_matmul
    train_attention: float  # 3 x forward attention
    train_mtp: float  # 3 x MTP forward (matmuls + attention), 0 without MTP

    @property
    def forward(self) -> float:
        return self.forward_matmul + self.forward_attention

    @property
    def train(self) -> float:
        return self.train_matmul + self.train_attention + self.train_mtp


def flops_per_token(c: ModelConfig, seq_len: int, causal: bool = True) -> Flops:
    p = count_params(c)
    attn = attention_flops_per_token(c, seq_len, causal)
    mtp_attn = attn / c.num_hidden_layers * c.num_nextn_predict_layers
    mtp_fwd = 2 * p.mtp_matmul_active + mtp_attn if c.num_nextn_predict_layers else 0.0
    return Flops(seq_len=seq_len, forward_matmul=2 * p.matmul_active, forward_attention=attn,
                 train_matmul=6 * p.matmul_active, train_attention=3 * attn, train_mtp=3 * mtp_fwd)


# ----------------------------------------------------------------------------------------------
# memory

BYTES = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "fp4": 0.5}
# Block-scale overheads of the quantised formats: FP8 e4m3 with one fp32 scale per 128x128 block
# (DeepSeek-V3 `weight_scale_inv`), FP4 e2m1 with one 8-bit scale per 32 values (MX block format).
SCALE_BYTES = {"fp32": 0.0, "bf16": 0.0, "fp8": 4 / (128 * 128), "fp4": 1 / 32}


def weight_bytes(c: ModelConfig, dtype: str, include_mtp: bool = False) -> float:
    """Bytes of the weights in `dtype`. FP8/FP4 apply to linear layers (experts, attention, FFNs);
    embedding, head and norms stay bf16 and the router fp32, as in DeepSeek's FP8 release and
    widemoe's router contract. fp32 means everything fp32."""
    if dtype not in BYTES:
        raise CostError(f"dtype={dtype!r} must be one of {list(BYTES)}")
    p = count_params(c)
    parts = dict(p.total)
    if include_mtp:
        _add(parts, p.mtp_total)
    if dtype == "fp32":
        return 4.0 * (sum(parts.values()) + p.buffers)
    q = sum(parts.get(k, 0) for k in QUANTISED)
    router = parts["router"] + p.buffers
    rest = sum(parts.values()) - q - parts["router"]
    return q * (BYTES[dtype] + SCALE_BYTES[dtype]) + 2.0 * rest + 4.0 * router


def kv_elements_per_token_layer(c: ModelConfig) -> int:
    """Cached elements per token per layer: MLA latent + rotated k_pe, or GQA keys and values.
    DeepSeek-V4: the mean growth per token per layer once the sliding windows are full."""
    if c.is_v4:
        return v4_kv_growth_per_token(c) / c.num_hidden_layers  # type: ignore[return-value]
    if c.is_mla:
        return c.kv_lora_rank + c.qk_rope_head_dim
    return 2 * c.kv_heads * c.gqa_head_dim


def kv_uncompressed_elements_per_token_layer(c: ModelConfig) -> int:
    """What a naive MHA cache of the expanded K and V would hold: the over-estimate to avoid for MLA."""
    if c.is_mla:
        return c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
    return kv_elements_per_token_layer(c)


def kv_bytes(c: ModelConfig, tokens: int, batch: int = 1, dtype: str = "bf16") -> float:
    """KV cache bytes for `batch` sequences of `tokens` positions (main layers; MTP holds none)."""
    if tokens < 0 or batch < 0:
        raise CostError(f"context={tokens} and batch={batch} must be >= 0")
    if dtype not in BYTES:
        raise CostError(f"kv dtype={dtype!r} must be one of {list(BYTES)}")
    if c.is_v4:  # not linear in tokens: a fixed window plus compressed entries every m / m' tokens
        return v4_kv_elements(c, tokens) * batch * BYTES[dtype]
    return kv_elements_per_token_layer(c) * c.num_hidden_layers * tokens * batch * BYTES[dtype]


ADAMW_BYTES_PER_PARAM = 16  # fp32 master weight 4 + fp32 grad 4 + exp_avg 4 + exp_avg_sq 4


def training_bytes_per_gpu(c: ModelConfig, dp: int, ep: int = 1, pp: int = 1,
                           zero: int = 3) -> dict[str, float]:
    """Static AdamW memory per GPU (weights, grads, optimizer states; activations excluded).

    `dp` data-parallel ranks per pipeline stage; `ep` of them split the routed experts (E/ep each);
    `pp` pipeline stages split the layers evenly (an approximation: embedding/head sit on end stages).
    zero=3 (FSDP2): everything sharded: `16·(N_dense + N_experts)/dp` (experts: ep x dp/ep shards).
    zero=1 (DeepSeek-V3's layout): bf16 weights (2 B) and fp32 grads (4 B) replicated within the
    layout (experts only E/ep), fp32 master + Adam moments (12 B) sharded over dp.
    """
    for name, v in (("dp", dp), ("ep", ep), ("pp", pp)):
        if not isinstance(v, int) or v < 1:
            raise CostError(f"{name}={v!r} must be a positive integer")
    if dp % ep:
        raise CostError(f"ep={ep} must divide dp={dp} (expert-parallel ranks are data-parallel ranks)")
    if c.n_routed_experts and c.n_routed_experts % ep:
        raise CostError(f"ep={ep} must divide n_routed_experts={c.n_routed_experts}")
    if zero not in (1, 3):
        raise CostError(f"zero={zero} must be 1 or 3")
    p = count_params(c)
    n_exp = (p.total["routed_experts"] + p.mtp_total["routed_experts"]) / pp
    n_rest = (p.total_with_mtp + p.buffers) / pp - n_exp
    if zero == 3:
        states = ADAMW_BYTES_PER_PARAM * (n_rest + n_exp) / dp
        return {"weights_and_grads": 0.0, "sharded_states": states, "total": states}
    held = 6.0 * (n_rest + n_exp / ep)
    states = 12.0 * (n_rest + n_exp) / dp
    return {"weights_and_grads": held, "sharded_states": states, "total": held + states}


# ----------------------------------------------------------------------------------------------
# hardware, training cost, serving


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


def training_flops(c: ModelConfig, tokens: float, seq_len: int) -> float:
    return flops_per_token(c, seq_len).train * tokens


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


# ----------------------------------------------------------------------------------------------
# dense contrast rows (counts only, no ModelConfig)


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


# ----------------------------------------------------------------------------------------------
# published figures, each compared with the count that uses the same convention


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


__all__ = [
    "BYTES", "COMPONENTS", "CostError", "DenseContrast", "Flops", "GPT5_CLASS_DENSE", "GPUS", "Gpu",
    "PUBLISHED", "PUBLISHED_V4", "ParamCount", "Published", "V3_TRAINING",
    "attention_flops_per_token", "check_published",
    "computed_quantity", "count_params", "flops_per_token", "get_gpu", "gpu_hours",
    "implied_mfu", "kv_bytes", "kv_elements_per_token_layer", "kv_uncompressed_elements_per_token_layer",
    "load_config", "mtp_redundant_copies", "parse_amount", "parse_context", "serving_gpus",
    "training_bytes_per_gpu", "training_flops", "v3_implied_mfu", "v4_attention_flops_at", "v4_kv_elements",
    "v4_kv_growth_per_token",
    "weight_bytes",
]
