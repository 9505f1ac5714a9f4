"""Closed forms of DeepSeek-V4 (widemoe.model.deepseek_v4; shared/reference/deepseek_v4.md section 4):
parameters, attention FLOPs and the compressed KV cache. `widemoe.cost.families` maps
model_type "deepseek_v4" to `FORMULAS`.

Components: "attention" holds the attention projections, compressors, indexer and the per-layer
hyper-connection (mHC) matrices; "norms" every RMSNorm weight; the additive vectors (sinks,
compressor position biases, mHC bases and scales) are counted in `biases` (no matmul FLOPs).
The cache is not linear in the context: a sliding window of W-1 positions per layer plus a
compressed entry every m (CSA, with its index key) or m' (HCA) tokens.

Shapes: D hidden, H heads, d the shared K=V head width, q the query rank, n the mHC streams,
m / m' the CSA / HCA compression rates, ci / Hi the indexer head width / heads.
"""

from __future__ import annotations

from widemoe.config import V4_LAYER_TYPES, ModelConfig
from widemoe.cost.formulas import FamilyFormulas, ParamCount, add_counts, swiglu, zero_counts

SW, CSA, HCA = V4_LAYER_TYPES  # sliding-only, compressed sparse, heavily compressed


def _attention(c: ModelConfig, layer_type: str) -> tuple[int, int, int]:
    """(matmul weights, norm weights, additive vectors) of one V4 attention layer plus its two mHC sites."""
    D, H, d, q = c.hidden_size, c.num_attention_heads, c.gqa_head_dim, c.q_lora_rank
    g, o, n = c.o_groups, c.o_lora_rank, c.hc_mult
    mats = D * q + q * H * d + D * d + H * d * o + g * o * D
    norms, adds = q + d, H  # q_a_norm, kv_norm; sinks
    if layer_type == CSA:
        m, ci, Hi = c.compress_rate_csa, c.index_head_dim, c.index_n_heads
        mats += 4 * D * d + 4 * D * ci + q * Hi * ci + D * Hi
        norms += d + ci
        adds += m * 2 * d + m * 2 * ci
    elif layer_type == HCA:
        mats += 2 * D * d
        norms += d
        adds += c.compress_rate_hca * d
    mats += 2 * (2 + n) * n * n * D  # attn_hc.fn, ffn_hc.fn
    adds += 2 * ((2 + n) * n + 3)  # their base and scale
    return mats, norms, adds


def _layer(c: ModelConfig, layer_type: str, active: bool) -> tuple[dict[str, int], int]:
    D, I = c.hidden_size, c.moe_intermediate_size
    out = zero_counts()
    mats, norms, adds = _attention(c, layer_type)
    out["attention"] = mats + adds
    out["norms"] = norms + 2 * D
    out["routed_experts"] = (c.num_experts_per_tok if active else c.n_routed_experts) * swiglu(D, I)
    out["shared_experts"] = swiglu(D, c.n_shared_experts * I)
    out["router"] = c.n_routed_experts * D
    return out, adds


def count_params(c: ModelConfig) -> ParamCount:
    """Closed-form parameter counts of the V4 model: main layers, hc_head, MTP blocks apart."""
    V, D, n = c.vocab_size, c.hidden_size, c.hc_mult
    total, active = zero_counts(), zero_counts()
    for acc in (total, active):
        acc["embedding"] = V * D
        acc["head"] = 0 if c.tie_word_embeddings else V * D
        acc["norms"] = D
        acc["attention"] = n * n * D + n + 1  # hc_head
    biases = n + 1
    for t in c.v4_layer_types:
        layer, adds = _layer(c, t, active=False)
        add_counts(total, layer)
        add_counts(active, _layer(c, t, active=True)[0])
        biases += adds
    buffers = (c.num_hidden_layers - c.num_hash_layers) * c.n_routed_experts
    k = c.num_nextn_predict_layers
    mtp_total, mtp_active = zero_counts(mtp=True), zero_counts(mtp=True)
    mtp_biases = 0
    for _ in range(k):  # enorm, hnorm, e_proj, h_proj, a sliding-only block, hc_head, norm
        for acc, act in ((mtp_total, False), (mtp_active, True)):
            layer, adds = _layer(c, SW, act)
            add_counts(acc, layer)
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
        if t == CSA:
            total += (tokens // c.compress_rate_csa) * (d + c.index_head_dim)
        elif t == HCA:
            total += (tokens // c.compress_rate_hca) * d
    return total


def v4_kv_growth_per_token(c: ModelConfig) -> float:
    """Elements added per token over all layers once the windows are full (Flash: 21·160 + 20·4)."""
    per = {CSA: (c.gqa_head_dim + c.index_head_dim) / c.compress_rate_csa,
           HCA: c.gqa_head_dim / c.compress_rate_hca, SW: 0.0}
    return sum(per[t] for t in c.v4_layer_types)


def kv_elements_per_token_layer(c: ModelConfig) -> float:
    """The mean growth per token per layer once the sliding windows are full."""
    return v4_kv_growth_per_token(c) / c.num_hidden_layers


def v4_attention_flops_at(c: ModelConfig, ctx: float) -> float:
    """DeepSeek-V4 attention FLOPs of one query that sees `ctx` earlier tokens (all layers): scores and
    values over min(ctx, W) window keys plus min(index_topk, ctx/m) CSA or ctx/m' HCA entries, and the
    CSA indexer's scan of all ctx/m index keys (Hi·ci MACs each). Causal means use the mean context
    (T+1)/2, which is exact for the linear terms and close for the min() terms."""
    H, d = c.num_attention_heads, c.gqa_head_dim
    total = 0.0
    for t in c.v4_layer_types:
        keys = min(ctx, c.sliding_window)
        if t == CSA:
            entries = ctx / c.compress_rate_csa
            keys += min(c.index_topk, entries)
            total += 2 * c.index_n_heads * c.index_head_dim * entries
        elif t == HCA:
            keys += ctx / c.compress_rate_hca
        total += 2 * H * 2 * d * keys  # K = V: scores and values both over d channels
    return total


FORMULAS = FamilyFormulas(
    count_params=count_params,
    attention_flops_at=v4_attention_flops_at,
    kv_elements=v4_kv_elements,
    kv_elements_per_token_layer=kv_elements_per_token_layer,
    kv_contrast_preset="deepseek-v3",  # V3's MLA cache at the same context shows what compression saves
)

__all__ = ["FORMULAS", "count_params", "v4_attention_flops_at", "v4_kv_elements", "v4_kv_growth_per_token"]
