"""Closed forms of the standard decoder: MLA or GQA attention, SwiGLU dense FFNs, routed and shared
experts, MTP modules (DeepSeek-V3, Kimi K2, DeepSeek-V2, Qwen3-MoE, Mixtral, OLMoE).

Every family without blocks of its own is costed here: its differences (MLA or GQA, qk-norm,
attention biases, dense layers, tied embeddings, selection bias) are config fields, not branches on
the family. The counts equal `sum(p.numel())` of `WideMoeForCausalLM` (tests/test_cost.py).

Shapes: D hidden, H heads, E routed experts, K experts per token, I expert width, V vocab.
"""

from __future__ import annotations

from widemoe.config import ModelConfig
from widemoe.cost.formulas import FamilyFormulas, ParamCount, add_counts, swiglu, zero_counts


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
    return n + attention_biases(c)  # q, k, v and o biases when attention_bias is set


def attention_biases(c: ModelConfig) -> int:
    """Bias elements of one attention layer (GQA with attention_bias only)."""
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


def _layer(c: ModelConfig, moe: bool, active: bool) -> dict[str, int]:
    """Parameters of one decoder layer by component (`active`: routed experts scaled to K of E)."""
    D, I = c.hidden_size, c.moe_intermediate_size
    out = zero_counts()
    out["attention"] = attention_weights(c)
    out["norms"] = layer_norms(c)
    if moe:
        experts = c.num_experts_per_tok if active else c.n_routed_experts
        out["routed_experts"] = experts * swiglu(D, I)
        out["shared_experts"] = swiglu(D, c.n_shared_experts * I)
        out["router"] = c.n_routed_experts * D  # every token scores all E experts
    else:
        out["dense_ffn"] = swiglu(D, c.intermediate_size)
    return out


def count_params(c: ModelConfig) -> ParamCount:
    """Closed-form parameter counts of `WideMoeForCausalLM(c)` (names in docs/internals.md)."""
    V, D = c.vocab_size, c.hidden_size
    total, active = zero_counts(), zero_counts()
    total["embedding"] = active["embedding"] = V * D
    total["head"] = active["head"] = 0 if c.tie_word_embeddings else V * D
    total["norms"] = active["norms"] = D  # final model.norm
    for i in range(c.num_hidden_layers):
        moe = c.is_moe_layer(i)
        add_counts(total, _layer(c, moe, active=False))
        add_counts(active, _layer(c, moe, active=True))
    moe_layers = len(c.moe_layer_indices)
    bias_per_moe = c.n_routed_experts if c.uses_selection_bias else 0
    buffers = moe_layers * bias_per_moe

    k = c.num_nextn_predict_layers
    mtp_moe = moe_layers > 0  # the MTP block is MoE unless the main model has no MoE layers
    mtp_total, mtp_active = zero_counts(mtp=True), zero_counts(mtp=True)
    for _ in range(k):
        for acc, act in ((mtp_total, False), (mtp_active, True)):
            add_counts(acc, _layer(c, mtp_moe, act))
            acc["norms"] += 3 * D  # enorm, hnorm, shared_head_norm
            acc["eh_proj"] += 2 * D * D
        if mtp_moe:
            buffers += bias_per_moe
    return ParamCount(total=total, active=active, mtp_total=mtp_total, mtp_active=mtp_active,
                      buffers=buffers, tied=c.tie_word_embeddings, mtp_modules=k,
                      biases=c.num_hidden_layers * attention_biases(c), mtp_biases=k * attention_biases(c))


def attention_flops_at(c: ModelConfig, ctx: float) -> float:
    """Scores `2·H·d_qk·ctx` and values `2·H·d_v·ctx` per layer, all layers."""
    d_v = c.v_head_dim if c.is_mla else c.gqa_head_dim
    return c.num_hidden_layers * 2 * c.num_attention_heads * (c.qk_head_dim + d_v) * ctx


def kv_elements_per_token_layer(c: ModelConfig) -> int:
    """Cached elements per token per layer: MLA latent + rotated k_pe, or GQA keys and values."""
    if c.is_mla:
        return c.kv_lora_rank + c.qk_rope_head_dim
    return 2 * c.kv_heads * c.gqa_head_dim


def kv_elements(c: ModelConfig, tokens: int) -> int:
    """Cached elements of one sequence: linear in the tokens (MTP modules hold none)."""
    return kv_elements_per_token_layer(c) * c.num_hidden_layers * tokens


FORMULAS = FamilyFormulas(
    count_params=count_params,
    attention_flops_at=attention_flops_at,
    kv_elements=kv_elements,
    kv_elements_per_token_layer=kv_elements_per_token_layer,
)

__all__ = ["FORMULAS", "attention_biases", "attention_weights", "count_params", "layer_norms"]
