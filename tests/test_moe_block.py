"""MoE block: composition, HF parity, routing statistics, aux losses, bf16 routing, capacity."""

from __future__ import annotations

import pytest
import torch

from oracles import reference_moe
from widemoe.model.moe import MoE, RoutingInfo
from widemoe.presets import get_preset


def _block(seed: int = 0, **overrides) -> MoE:
    torch.manual_seed(seed)
    m = MoE(get_preset("micro", **overrides), layer_idx=1)
    with torch.no_grad():
        m.gate.weight.normal_(std=0.3)
        m.experts.gate_up_proj.normal_(std=0.2)
        m.experts.down_proj.normal_(std=0.2)
    return m


def test_block_is_router_plus_reference_experts_plus_shared():
    m = _block()
    x = torch.randn(2, 12, 64)
    y, info = m(x)
    assert isinstance(info, RoutingInfo) and info.layer_idx == 1
    x_ND = x.view(-1, 64)
    r = m.gate(x_ND)
    want = reference_moe(x_ND, m.experts.gate_up_proj, m.experts.down_proj, r.topk_ids, r.topk_weights)
    want = want + m.shared_experts(x_ND)
    torch.testing.assert_close(y.view(-1, 64), want)
    assert info.topk_ids.shape == (24, 2) and info.topk_weights.dtype == torch.float32
    assert info.counts.dtype == torch.float32 and info.counts.sum() == 48
    assert info.aux == {} and info.dropped_fraction == 0.0


def test_no_shared_experts_when_zero():
    assert _block(n_shared_experts=0).shared_experts is None
    m = _block(n_shared_experts=2)
    assert m.shared_experts.gate_proj.weight.shape == (2 * 32, 64)


def test_matches_transformers_deepseek_v3_moe():
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    m = _block()
    with torch.no_grad():
        m.gate.e_score_correction_bias.normal_(std=0.1)
    c = m.config
    hf_cfg = hf.DeepseekV3Config(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8,
                                 n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                                 routed_scaling_factor=2.5, norm_topk_prob=True)
    ref = hf.DeepseekV3MoE(hf_cfg)
    missing, unexpected = ref.load_state_dict(m.state_dict(), strict=True)
    assert not missing and not unexpected  # same parameter names as transformers v5
    x = torch.randn(2, 10, c.hidden_size)
    torch.testing.assert_close(m(x)[0], ref(x), rtol=1e-5, atol=1e-6)


def test_tokens_per_expert_counts_in_training_only():
    m = _block()
    assert "tokens_per_expert" not in m.state_dict()  # non-persistent
    x = torch.randn(2, 8, 64)
    m.eval()
    with torch.no_grad():
        m(x)
    assert m.tokens_per_expert.sum() == 0
    m.train()
    _, info1 = m(x)
    _, info2 = m(torch.randn(2, 8, 64))
    torch.testing.assert_close(m.tokens_per_expert, info1.counts + info2.counts)
    assert m.tokens_per_expert.sum() == 2 * 16 * 2
    m.to(torch.bfloat16)
    assert m.tokens_per_expert.dtype == torch.float32


def test_seq_aux_loss_matches_direct_formula():
    m = _block(aux_loss_alpha=1e-3)
    B, T, E, K = 3, 7, 8, 2
    x = torch.randn(B, T, 64)
    _, info = m(x)
    scores = m.gate(x.view(-1, 64)).scores.view(B, T, E)
    ids = info.topk_ids.view(B, T, K)
    per_seq = []
    for b in range(B):
        f = torch.tensor([(ids[b] == i).sum().item() for i in range(E)], dtype=torch.float32) * E / (K * T)
        P = torch.stack([scores[b, t] / scores[b, t].sum() for t in range(T)]).mean(0)
        per_seq.append((f * P).sum())
    torch.testing.assert_close(info.aux["seq_aux"], torch.stack(per_seq).mean())
    assert set(info.aux) == {"seq_aux"}
    info.aux["seq_aux"].backward()  # differentiable through P
    assert m.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_switch_aux_and_z_loss_match_direct_formulas(scoring):
    m = _block(router_aux_loss_coef=0.01, router_z_loss_coef=1e-3, scoring_func=scoring,
               topk_method="greedy" if scoring == "softmax" else "noaux_tc", n_group=1, topk_group=1)
    x = torch.randn(2, 9, 64)
    _, info = m(x)
    r = m.gate(x.view(-1, 64))
    N, E, K = 18, 8, 2
    f = torch.tensor([(r.topk_ids == i).sum().item() for i in range(E)], dtype=torch.float32) / (N * K)
    probs = r.logits.softmax(-1) if scoring == "softmax" else r.scores / r.scores.sum(-1, keepdim=True)
    torch.testing.assert_close(info.aux["switch_aux"], E * (f * probs.mean(0)).sum())
    z = torch.stack([torch.log(torch.exp(row).sum()) ** 2 for row in r.logits]).mean()
    torch.testing.assert_close(info.aux["z_loss"], z)
    assert set(info.aux) == {"switch_aux", "z_loss"}


def test_bf16_block_routes_like_fp32_block():
    m32 = _block(seed=5)
    m16 = _block(seed=5).to(torch.bfloat16)
    assert m16.gate.weight.dtype == torch.float32 and m16.experts.gate_up_proj.dtype == torch.bfloat16
    x = torch.randn(4, 64, 64).bfloat16()  # the same bf16-representable input for both
    with torch.no_grad():
        y32, i32 = m32(x.float())
        y16, i16 = m16(x)
    same = (i32.topk_ids.sort(-1).values == i16.topk_ids.sort(-1).values).all(-1)
    # the router sees identical fp32 inputs and weights: routing is exact, not just close
    assert same.all()
    assert y16.dtype == torch.bfloat16
    assert (y16.float() - y32).norm() / y32.norm() < 2e-2  # bf16 weights and activations, same routing
    # bf16 *hidden states* from a bf16 upstream (rounded differently): vast majority routes the same
    x_noisy = (x.float() + 1e-3 * torch.randn_like(x.float()))
    with torch.no_grad():
        _, j32 = m32(x_noisy)
        _, j16 = m16(x_noisy.bfloat16())
    agree = (j32.topk_ids.sort(-1).values == j16.topk_ids.sort(-1).values).all(-1).float().mean()
    assert agree >= 0.9


def test_capacity_drops_in_training_never_in_eval():
    m = _block(capacity_factor=0.5, n_group=1, topk_group=1)
    with torch.no_grad():
        m.gate.e_score_correction_bias[0] = 5.0  # every token wants expert 0: heavy overflow
    x = torch.randn(2, 16, 64)
    m.train()
    y_train, info = m(x)
    # capacity = ceil(0.5 * 32 * 2 / 8) = 4, so at least 32 - 4 of expert 0's pairs are dropped
    assert info.dropped_fraction >= 28 / 64
    m.eval()
    y_eval, info_eval = m(x)
    assert info_eval.dropped_fraction == 0.0
    x_ND = x.view(-1, 64)
    r = m.gate(x_ND)
    dropless = reference_moe(x_ND, m.experts.gate_up_proj, m.experts.down_proj, r.topk_ids, r.topk_weights)
    torch.testing.assert_close(y_eval.view(-1, 64), dropless + m.shared_experts(x_ND))
    assert not torch.allclose(y_train, y_eval)


def test_token_ids_argument_is_accepted():
    m = _block()
    x = torch.randn(1, 5, 64)
    y1, _ = m(x)
    y2, _ = m(x, token_ids_BT=torch.arange(5).view(1, 5))
    torch.testing.assert_close(y1, y2)
