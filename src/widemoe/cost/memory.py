"""Memory of a ModelConfig: weights in each format, the KV cache, and static AdamW memory per GPU.

Weights: FP8/FP4 apply to the linear layers (experts, attention, FFNs) with their block-scale
overheads; embedding, head and norms stay bf16 and the router fp32, as in DeepSeek's FP8 release and
widemoe's router contract. The KV cache is the family's (`FamilyFormulas.kv_elements`): MLA latent +
rotated k_pe, GQA keys and values, or DeepSeek-V4's window plus compressed entries. It equals
`KVCache.nbytes()` after decoding (tests/test_cost.py). Sizes are bytes (decimal GB = 1e9 when printed).
"""

from __future__ import annotations

from widemoe.config import ModelConfig
from widemoe.cost.counts import count_params
from widemoe.cost.families import formulas_for
from widemoe.cost.formulas import QUANTISED, add_counts
from widemoe.cost.units import CostError

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
        add_counts(parts, p.mtp_total)
    if dtype == "fp32":
        return 4.0 * (sum(parts.values()) + p.buffers)
    q = sum(parts.get(k, 0) for k in QUANTISED)
    router = parts["router"] + p.buffers
    rest = sum(parts.values()) - q - parts["router"]
    return q * (BYTES[dtype] + SCALE_BYTES[dtype]) + 2.0 * rest + 4.0 * router


def kv_elements_per_token_layer(c: ModelConfig) -> float:
    """Cached elements per token per layer: MLA latent + rotated k_pe, or GQA keys and values.
    DeepSeek-V4: the mean growth per token per layer once the sliding windows are full."""
    return formulas_for(c).kv_elements_per_token_layer(c)


def kv_uncompressed_elements_per_token_layer(c: ModelConfig) -> float:
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
    return formulas_for(c).kv_elements(c, tokens) * batch * BYTES[dtype]


def kv_bytes_per_token(c: ModelConfig, context: int, batch: int = 1, dtype: str = "bf16") -> float:
    """Cache bytes per token, averaged over `batch` x `context` positions: caches that are not linear
    in the context (V4: a fixed window plus an entry every m tokens) are reported at the chosen
    context; for linear ones this is the same as one token's bytes."""
    if context:
        return kv_bytes(c, context, batch, dtype) / (context * batch)
    return kv_bytes(c, 1, 1, dtype)


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


__all__ = ["ADAMW_BYTES_PER_PARAM", "BYTES", "SCALE_BYTES", "kv_bytes", "kv_bytes_per_token",
           "kv_elements_per_token_layer", "kv_uncompressed_elements_per_token_layer",
           "training_bytes_per_gpu", "weight_bytes"]
