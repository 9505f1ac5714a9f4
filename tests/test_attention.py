"""MLA and GQA attention against transformers 5.24, absorbed vs naive MLA, cached decoding, padding,
and the KV cache itself."""

from __future__ import annotations

import pytest
import torch
from transformers import DeepseekV3Config, OlmoeConfig, Qwen3MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
)
from transformers.models.olmoe.modeling_olmoe import OlmoeAttention, OlmoeRotaryEmbedding
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention, Qwen3MoeRotaryEmbedding

from hf_helpers import hf_rope_parameters
from widemoe.cache import KVCache, LayerCache
from widemoe.config import ConfigError
from widemoe.model.attention import GQAttention, MLAttention, attend, build_attention, causal_mask
from widemoe.model.layers import RotaryEmbedding, apply_rope
from widemoe.presets import get_preset

MICRO = get_preset("micro")  # MLA with q_lora, YaRN original length 32
MICRO_NOQ = MICRO.replace(q_lora_rank=None)
QWEN = get_preset("micro", model_type="qwen3_moe", kv_lora_rank=None, q_lora_rank=None,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, qk_norm="head",
                  rope_interleave=False, rope_scaling=None, rope_theta=1e6, rms_norm_eps=1e-6)
QWEN_YARN = QWEN.replace(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                         attention_bias=True)
OLMOE = get_preset("micro", model_type="olmoe", kv_lora_rank=None, q_lora_rank=None, num_attention_heads=4,
                   num_key_value_heads=4, qk_norm="full", rope_interleave=False, rope_scaling=None,
                   rms_norm_eps=1e-5)
CONFIGS = {"mla": MICRO, "mla_noq": MICRO_NOQ, "qwen": QWEN, "qwen_yarn": QWEN_YARN, "olmoe": OLMOE}
MLA_HALF = MICRO_NOQ.replace(rope_interleave=False, attention_bias=True)  # transformers supports both




def hf_attention(cfg):
    """The transformers attention module and rotary embedding of cfg's family, eager attention."""
    common = dict(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                  max_position_embeddings=cfg.max_position_embeddings,
                  rope_parameters=hf_rope_parameters(cfg), rms_norm_eps=cfg.rms_norm_eps,
                  attention_bias=cfg.attention_bias)
    if cfg.is_mla:
        hc = DeepseekV3Config(**common, num_key_value_heads=cfg.num_attention_heads,
                              q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
                              qk_nope_head_dim=cfg.qk_nope_head_dim,
                              qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                              rope_interleave=cfg.rope_interleave)
        cls, rot = DeepseekV3Attention, DeepseekV3RotaryEmbedding
    elif cfg.qk_norm == "head":
        hc = Qwen3MoeConfig(**common, num_key_value_heads=cfg.kv_heads, head_dim=cfg.gqa_head_dim)
        cls, rot = Qwen3MoeAttention, Qwen3MoeRotaryEmbedding
    else:
        hc = OlmoeConfig(**common, num_key_value_heads=cfg.kv_heads)
        cls, rot = OlmoeAttention, OlmoeRotaryEmbedding
    hc._attn_implementation = "eager"
    return cls(hc, layer_idx=0).eval(), rot(hc)


def make(cfg, seed: int = 0):
    torch.manual_seed(seed)
    attn = build_attention(cfg, 0).eval()
    with torch.no_grad():
        for n, p in attn.named_parameters():  # random norms and biases too, so a missed norm/bias shows
            if p.dim() == 2:  # unit-variance activations: outputs O(1), so atol 1e-5 is meaningful
                p.copy_(torch.randn_like(p) * p.shape[1] ** -0.5)
            elif n.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
            else:
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
    return attn, RotaryEmbedding(cfg)


def run_full(attn, rot, x, pos, mask=None):
    cos, sin = rot(pos)
    B, T, _ = x.shape
    return attn(x, cos, sin, causal_mask(B, T, T) if mask is None else mask, None)


def run_chunks(attn, rot, x, pos, sizes, mask_full=None):
    """Feed x in chunks of the given sizes through a cache; mask_full [B, T, T] is sliced per chunk."""
    B, T, _ = x.shape
    cache, outs, start = KVCache(1), [], 0
    for n in sizes:
        cos, sin = rot(pos[:, start:start + n])
        m = (causal_mask(B, T, T) if mask_full is None else mask_full)[:, start:start + n, :start + n]
        outs.append(attn(x[:, start:start + n], cos, sin, m, cache.layer(0)))
        start += n
    assert start == T and cache.seq_len == T
    return torch.cat(outs, 1), cache


# --- parity with transformers ---------------------------------------------------------------------


@pytest.mark.parametrize("name", [*CONFIGS, "mla_half"])
def test_attention_equals_transformers(name):
    cfg = MLA_HALF if name == "mla_half" else CONFIGS[name]
    attn, rot = make(cfg)
    ref, hf_rot = hf_attention(cfg)
    missing = ref.load_state_dict(attn.state_dict(), strict=True)  # parameter names are transformers'
    assert not missing.missing_keys and not missing.unexpected_keys
    B, T = 2, 24
    x = torch.randn(B, T, cfg.hidden_size)
    pos = torch.arange(30, 30 + T)[None].expand(B, T)  # runs past YaRN's original length (32)
    mask = causal_mask(B, T, T)
    add_mask = torch.zeros(B, 1, T, T).masked_fill(~mask[:, None], torch.finfo(torch.float32).min)
    with torch.no_grad():
        y_ref, _ = ref(x, position_embeddings=hf_rot(x, pos), attention_mask=add_mask)
        y = run_full(attn, rot, x, pos)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    assert y.abs().mean() > 0.1  # O(1) outputs: the tolerance is meaningful


def test_mla_equals_transformers_deepseek_v2():
    # V2-Lite style: no q_lora, mscale 0.707; transformers' V2 rotates complex pairs and keeps them
    # interleaved (V3 de-interleaves): the layouts differ but q.k, hence the output, must not
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import (
        DeepseekV2Attention,
        DeepseekV2RotaryEmbedding,
    )

    cfg = MICRO_NOQ.replace(model_type="deepseek_v2",
                            rope_scaling={**MICRO.rope_scaling, "mscale": 0.707, "mscale_all_dim": 0.707})
    hc = DeepseekV2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
                          kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                          max_position_embeddings=128, rope_parameters=hf_rope_parameters(cfg))
    hc._attn_implementation = "eager"
    ref, hf_rot = DeepseekV2Attention(hc, 0).eval(), DeepseekV2RotaryEmbedding(hc)
    attn, rot = make(cfg)
    ref.load_state_dict(attn.state_dict(), strict=True)
    assert attn.scale == ref.scaling
    x, pos = torch.randn(2, 24, 64), torch.arange(30, 54)[None].expand(2, 24)
    add_mask = torch.zeros(2, 1, 24, 24).masked_fill(~causal_mask(2, 24, 24)[:, None], -1e30)
    with torch.no_grad():
        y_ref = ref(x, position_embeddings=hf_rot(x, pos), attention_mask=add_mask)[0]
        torch.testing.assert_close(run_full(attn, rot, x, pos), y_ref, rtol=0, atol=1e-5)


def test_parameter_names_follow_contract():
    assert set(build_attention(MICRO, 0).state_dict()) == {
        "q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight",
        "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"}
    assert "q_proj.weight" in build_attention(MICRO_NOQ, 0).state_dict()
    sd = build_attention(OLMOE, 0).state_dict()
    assert sd["q_norm.weight"].shape == (64,) and sd["k_norm.weight"].shape == (64,)
    sd = build_attention(QWEN_YARN, 0).state_dict()
    assert sd["q_norm.weight"].shape == (16,) and "k_proj.bias" in sd
    assert isinstance(build_attention(QWEN, 0), GQAttention)
    assert isinstance(build_attention(MICRO, 0), MLAttention)
    with pytest.raises(ConfigError, match="qk_norm"):
        MLAttention(MICRO.replace(qk_norm="head"), 0)


def reference_attend(q_BTHd, k_BSKd, v_BSKe, mask_BTS, scale):
    """Plain softmax attention, kv head h // G for query head h."""
    G = q_BTHd.shape[2] // k_BSKd.shape[2]
    k = k_BSKd.repeat_interleave(G, dim=2)
    v = v_BSKe.repeat_interleave(G, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q_BTHd, k) * scale
    scores = scores.masked_fill(~mask_BTS[:, None], float("-inf")).softmax(-1)
    return torch.einsum("bhts,bshe->bthe", scores, v)


@pytest.mark.parametrize("T, S, H, K, d, e", [
    (1, 9, 4, 1, 12, 12), (3, 9, 6, 2, 8, 8), (20, 20, 4, 4, 12, 8), (20, 25, 4, 1, 8, 8),
    (20, 20, 6, 3, 8, 8), (5, 5, 2, 2, 6, 10)])
def test_attend_equals_reference(T, S, H, K, d, e):
    # covers every SDPA route: folded heads (T <= 16), MQA expand, enable_gqa, plain, and unequal widths
    torch.manual_seed(0)
    q, k, v = torch.randn(2, T, H, d), torch.randn(2, S, K, d), torch.randn(2, S, K, e)
    mask = (torch.rand(2, T, S) < 0.7) | causal_mask(2, T, S)
    torch.testing.assert_close(attend(q, k, v, mask, 0.3), reference_attend(q, k, v, mask, 0.3),
                               rtol=0, atol=1e-5)
    if T == S:  # mask=None: causal
        torch.testing.assert_close(attend(q, k, v, None, 0.3),
                                   reference_attend(q, k, v, causal_mask(2, T, S), 0.3), rtol=0, atol=1e-5)


# --- absorbed MLA and cached decoding -------------------------------------------------------------


@pytest.mark.parametrize("name", ["mla", "mla_noq"])
def test_absorbed_mla_prefill_equals_naive(name):
    attn, rot = make(CONFIGS[name])
    x = torch.randn(2, 20, 64)
    pos = torch.arange(20)[None].expand(2, 20)
    with torch.no_grad():
        naive = run_full(attn, rot, x, pos)
        absorbed, cache = run_chunks(attn, rot, x, pos, [20])
    torch.testing.assert_close(absorbed, naive, rtol=0, atol=1e-5)
    assert cache.layer(0).names() == ["latent"]


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("sizes", [[5] + [1] * 15, [7, 4, 1, 8], [1] * 20])
def test_cached_decoding_equals_full_forward(name, sizes):
    cfg = CONFIGS[name]
    attn, rot = make(cfg)
    x = torch.randn(2, 20, cfg.hidden_size)
    pos = torch.arange(20, 40)[None].expand(2, 20)
    with torch.no_grad():
        full = run_full(attn, rot, x, pos)
        inc, _ = run_chunks(attn, rot, x, pos, sizes)
    torch.testing.assert_close(inc, full, rtol=0, atol=1e-5)


def test_cache_contents_and_bytes_per_token():
    for cfg in (MICRO, MICRO_NOQ):
        for dtype in (torch.float32, torch.bfloat16):
            attn, rot = make(cfg)
            attn = attn.to(dtype)
            x = torch.randn(3, 9, 64, dtype=dtype)
            with torch.no_grad():
                _, cache = run_chunks(attn, rot, x, torch.arange(9)[None].expand(3, 9), [4, 1, 4])
            per_token = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * torch.finfo(dtype).bits // 8
            assert cache.nbytes() == 3 * 9 * per_token
    # GQA: k and v per kv head, after k_norm and RoPE
    attn, rot = make(QWEN)
    x = torch.randn(1, 6, 64)
    pos = torch.arange(6)[None]
    with torch.no_grad():
        _, cache = run_chunks(attn, rot, x, pos, [6])
        cos, sin = rot(pos)
        k = apply_rope(attn.k_norm(attn.k_proj(x).view(1, 6, 2, 16)), cos, sin, False)
    torch.testing.assert_close(cache.layer(0).get("k"), k)
    assert cache.nbytes() == 2 * 6 * 2 * 16 * 4


@pytest.mark.parametrize("name", ["mla", "qwen"])
def test_bf16_cached_decoding_close_to_full_forward(name):
    cfg = CONFIGS[name]
    attn, rot = make(cfg)
    attn = attn.to(torch.bfloat16)
    x = torch.randn(2, 12, cfg.hidden_size, dtype=torch.bfloat16)
    pos = torch.arange(12)[None].expand(2, 12)
    with torch.no_grad():
        full = run_full(attn, rot, x, pos)
        inc, cache = run_chunks(attn, rot, x, pos, [5, 1, 6])
    assert full.dtype == inc.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in cache.layer(0)._buf.values())
    torch.testing.assert_close(inc.float(), full.float(), rtol=0.05, atol=0.05)


# --- padding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mla", "qwen", "olmoe"])
def test_left_padding_matches_unpadded(name):
    cfg = CONFIGS[name]
    attn, rot = make(cfg)
    torch.manual_seed(1)
    T, pad = 12, 4
    x = torch.randn(2, T, cfg.hidden_size)
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, :pad] = False  # row 1: 4 left pads, then the T-4 tokens of a shorter sequence
    pos = (valid.cumsum(-1) - 1).clamp(min=0)  # positions count from each row's first real token
    mask = causal_mask(2, T, T) & valid[:, None, :]
    with torch.no_grad():
        y = run_full(attn, rot, x, pos, mask)
        y_inc, _ = run_chunks(attn, rot, x, pos, [6, 1, 1, 4], mask)
        alone = run_full(attn, rot, x[1:, pad:], torch.arange(T - pad)[None])
        alone0 = run_full(attn, rot, x[:1], torch.arange(T)[None])
    assert torch.isfinite(y).all() and torch.isfinite(y_inc).all()  # padded query rows have no key: no NaN
    torch.testing.assert_close(y[1:, pad:], alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(y[:1], alone0, rtol=0, atol=1e-5)
    torch.testing.assert_close(y_inc[1:, pad:], alone, rtol=0, atol=1e-5)


def test_fully_masked_rows_are_finite_even_in_math_kernel():
    # requires_grad routes SDPA to its math kernel, where a row with no allowed key would be NaN
    attn, rot = make(QWEN)
    x = torch.randn(1, 5, 64, requires_grad=True)
    mask = causal_mask(1, 5, 5).clone()
    mask[:, :2] = False
    y = run_full(attn, rot, x, torch.arange(5)[None], mask)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


# --- the cache ------------------------------------------------------------------------------------


def test_layer_cache_append_growth_and_views():
    lc = LayerCache()
    first = lc.append("a", torch.zeros(2, 3, 4))
    ptrs = set()
    for t in range(200):
        v = lc.append("a", torch.full((2, 1, 4), float(t)))
        ptrs.add(lc._buf["a"].data_ptr())
    assert v.shape == (2, 203, 4) and torch.equal(v[:, 3:, 0], torch.arange(200.0).expand(2, 200))
    assert len(ptrs) <= 5  # geometric growth: a handful of reallocations, not one per token
    assert torch.equal(first, torch.zeros(2, 3, 4))  # earlier views keep their values
    assert lc.nbytes() == 2 * 203 * 4 * 4 < lc.capacity_nbytes()
    assert lc.seq_len == 203
    with pytest.raises(ValueError, match="does not match"):
        lc.append("a", torch.zeros(3, 1, 4))


def test_kv_cache_select_drops_rows():
    cache = KVCache(2)
    for i in range(2):
        cache.layer(i).append("k", torch.arange(3.0)[:, None, None].expand(3, 4, 2))
    cache.select(torch.tensor([2, 0]))
    assert cache.layer(1).get("k")[:, 0, 0].tolist() == [2.0, 0.0]
    assert cache.seq_len == 4 and cache.nbytes() == 2 * (2 * 4 * 2 * 4)
    cache.layer(0).append("k", torch.zeros(2, 1, 2))
    assert cache.seq_len == 5 and len(cache) == 2
    with pytest.raises(RuntimeError, match=r"layers \[1\] hold \[4\] positions, expected 5"):
        cache.advance(5)  # layer 1 missed the new token
    cache.layer(1).append("k", torch.zeros(2, 1, 2))
    cache.advance(5)
