"""RMSNorm, SwiGLU, RoPE/YaRN and softmax scale against transformers 5.24 (the parity reference)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DeepseekV3Config, Qwen3MoeConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3MLP,
    DeepseekV3RMSNorm,
    DeepseekV3RotaryEmbedding,
    apply_rotary_pos_emb,
    apply_rotary_pos_emb_interleave,
    yarn_apply_mscale,
)
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

from hf_helpers import hf_rope_parameters
from widemoe.model.layers import (
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    apply_rope,
    mscale,
    rope_attention_factor,
    rope_inv_freq,
    softmax_scale,
)
from widemoe.presets import get_preset


def hf_deepseek_config(cfg) -> DeepseekV3Config:
    return DeepseekV3Config(
        hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rope_parameters=hf_rope_parameters(cfg),
        rope_interleave=cfg.rope_interleave, rms_norm_eps=cfg.rms_norm_eps, attention_bias=cfg.attention_bias,
    )


# --- norms and FFN --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers(dtype):
    torch.manual_seed(0)
    ours, ref = RMSNorm(48, eps=1e-6), DeepseekV3RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_()
    ref.load_state_dict(ours.state_dict())
    ours, ref = ours.to(dtype), ref.to(dtype)
    x = (torch.randn(3, 5, 48) * 7).to(dtype)
    assert torch.equal(ours(x), ref(x))
    assert ours(x).dtype == dtype


def test_rmsnorm_normalises_in_fp32():
    # a bf16 input whose squares overflow bf16 precision still normalises to unit RMS
    x = torch.full((1, 64), 300.0, dtype=torch.bfloat16)
    y = RMSNorm(64)(x)
    assert torch.allclose(y.float(), torch.ones(1, 64), atol=1e-2)


def test_swiglu_matches_transformers_mlp():
    torch.manual_seed(0)
    ours = SwiGLU(32, 48)
    ref = DeepseekV3MLP(DeepseekV3Config(hidden_size=32, intermediate_size=48))
    ref.load_state_dict(ours.state_dict())  # same parameter names: gate_proj, up_proj, down_proj
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)
    assert set(ours.state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight"}


# --- YaRN frequencies and scale -------------------------------------------------------------------

REAL = ["deepseek-v3", "kimi-k2", "deepseek-v2-lite"]


@pytest.mark.parametrize("name", REAL)
def test_yarn_inv_freq_equals_transformers(name):
    cfg = get_preset(name)
    hf = DeepseekV3RotaryEmbedding(hf_deepseek_config(cfg))
    ours = RotaryEmbedding(cfg)
    assert torch.equal(ours.inv_freq, hf.inv_freq)
    assert hf.attention_scaling == 1.0 == rope_attention_factor(cfg)  # DeepSeek: cos/sin stay unscaled
    # YaRN actually changed something: low-frequency channels are divided by the factor
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, 64, 2).float() / 64))
    s = cfg.rope_scaling["factor"]
    torch.testing.assert_close(ours.inv_freq[:8], base[:8])
    torch.testing.assert_close(ours.inv_freq[-4:], base[-4:] / s)


def test_kimi_yarn_is_a_hard_step():
    # beta_fast == beta_slow == 1: low=19, high=20 -> channels <= 19 keep, >= 20 are interpolated
    cfg = get_preset("kimi-k2")
    inv = rope_inv_freq(cfg)
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, 64, 2).float() / 64))
    ratio = base / inv
    assert torch.allclose(ratio[:20], torch.ones(20))
    assert torch.allclose(ratio[20:], torch.full((12,), 32.0))


def test_yarn_truncate_false_equals_transformers():
    cfg = get_preset("deepseek-v3")
    cfg = cfg.replace(rope_scaling={**cfg.rope_scaling, "truncate": False})
    hf = DeepseekV3RotaryEmbedding(hf_deepseek_config(cfg))
    assert torch.equal(rope_inv_freq(cfg), hf.inv_freq)
    assert not torch.equal(rope_inv_freq(cfg), rope_inv_freq(get_preset("deepseek-v3")))


def test_default_rope_inv_freq_equals_transformers():
    cfg = get_preset("qwen3-30b-a3b")
    hf_cfg = Qwen3MoeConfig(hidden_size=64, num_attention_heads=4, head_dim=128,
                            rope_parameters=hf_rope_parameters(cfg))
    assert torch.equal(rope_inv_freq(cfg), Qwen3MoeRotaryEmbedding(hf_cfg).inv_freq)


@pytest.mark.parametrize("name, factor", [("deepseek-v3", 1.8739), ("deepseek-v2-lite", 1.5896),
                                          ("kimi-k2", 1.8133)])
def test_softmax_scale_values(name, factor):
    cfg = get_preset(name)
    assert softmax_scale(cfg) == pytest.approx(factor * 192 ** -0.5, rel=1e-4)
    # exactly transformers' value
    assert softmax_scale(cfg) == yarn_apply_mscale(hf_rope_parameters(cfg), 192 ** -0.5)
    assert mscale(40, 1.0) == pytest.approx(0.1 * math.log(40) + 1)


def test_softmax_scale_without_yarn_and_gqa_yarn():
    assert softmax_scale(get_preset("qwen3-30b-a3b")) == 128 ** -0.5
    assert softmax_scale(get_preset("micro", rope_scaling=None)) == 24 ** -0.5
    # Qwen3 with YaRN: transformers scales cos/sin by 0.1 ln(s) + 1; widemoe folds its square into the scale
    q = get_preset("qwen3-30b-a3b", rope_scaling={"type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 32768})
    af = 0.1 * math.log(4.0) + 1
    assert rope_attention_factor(q) == pytest.approx(af)
    assert softmax_scale(q) == pytest.approx(128 ** -0.5 * af * af)


# --- rotation layouts -----------------------------------------------------------------------------


def test_rotary_forward_shapes_and_matches_transformers_cos():
    cfg = get_preset("micro")
    pos = torch.tensor([[0, 5, 40, 100], [3, 4, 5, 6]])
    cos, sin = RotaryEmbedding(cfg)(pos)
    assert cos.shape == sin.shape == (2, 4, cfg.rope_dim // 2) and cos.dtype == torch.float32
    hf_cos, hf_sin = DeepseekV3RotaryEmbedding(hf_deepseek_config(cfg))(torch.zeros(1), pos)
    assert torch.equal(cos, hf_cos[..., :4]) and torch.equal(sin, hf_sin[..., :4])


def test_rotary_stays_fp32_after_bf16_cast():
    cfg = get_preset("micro")
    rot = RotaryEmbedding(cfg).to(torch.bfloat16)
    cos, _ = rot(torch.arange(100)[None])
    ref, _ = RotaryEmbedding(cfg)(torch.arange(100)[None])
    assert cos.dtype == torch.float32 and torch.equal(cos, ref)


def test_interleaved_rope_equals_transformers_layout():
    torch.manual_seed(0)
    cfg = get_preset("micro")  # YaRN with original length 32: positions below run past it
    pos = torch.arange(30, 50)[None].expand(2, 20)
    hf_cos, hf_sin = DeepseekV3RotaryEmbedding(hf_deepseek_config(cfg))(torch.zeros(1), pos)
    cos, sin = RotaryEmbedding(cfg)(pos)
    q, k = torch.randn(2, 20, 4, 8), torch.randn(2, 20, 1, 8)
    hq, hk = apply_rotary_pos_emb_interleave(q.transpose(1, 2), k.transpose(1, 2), hf_cos, hf_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin, True), hq.transpose(1, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rope(k, cos, sin, True), hk.transpose(1, 2), rtol=0, atol=1e-6)
    # the output is de-interleaved: position 0 (angle 0) maps [x0,x1,x2,...] to [x0,x2,...,x1,x3,...]
    c0, s0 = RotaryEmbedding(cfg)(torch.zeros(1, 1, dtype=torch.long))
    x = torch.arange(8.0).view(1, 1, 1, 8)
    assert apply_rope(x, c0, s0, True).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_rotate_half_rope_equals_transformers():
    torch.manual_seed(0)
    cfg = get_preset("micro", kv_lora_rank=None, head_dim=16, num_key_value_heads=2, rope_interleave=False,
                     rope_scaling=None, rope_theta=1e6)
    hf_cfg = Qwen3MoeConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            rope_parameters=hf_rope_parameters(cfg))
    pos = torch.arange(7, 19)[None].expand(3, 12)
    hf_cos, hf_sin = Qwen3MoeRotaryEmbedding(hf_cfg)(torch.zeros(1), pos)
    cos, sin = RotaryEmbedding(cfg)(pos)
    q, k = torch.randn(3, 12, 4, 16), torch.randn(3, 12, 2, 16)
    hq, hk = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), hf_cos, hf_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin, False), hq.transpose(1, 2), rtol=0, atol=1e-6)
    torch.testing.assert_close(apply_rope(k, cos, sin, False), hk.transpose(1, 2), rtol=0, atol=1e-6)


def test_rope_is_relative_and_keeps_dtype():
    torch.manual_seed(0)
    cfg = get_preset("micro")
    rot = RotaryEmbedding(cfg)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i: int, j: int) -> torch.Tensor:
        ci, si = rot(torch.tensor([[i]]))
        cj, sj = rot(torch.tensor([[j]]))
        return (apply_rope(q, ci, si, True) * apply_rope(k, cj, sj, True)).sum()

    torch.testing.assert_close(score(10, 3), score(57, 50))
    assert not torch.allclose(score(10, 3), score(10, 4))
    c, s = rot(torch.arange(3)[None])
    assert apply_rope(torch.randn(1, 3, 2, 8, dtype=torch.bfloat16), c, s, False).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="d == 2"):
        apply_rope(torch.randn(1, 3, 2, 6), c, s, True)
