"""Router: parity with transformers 5.24 routers, group masking, bias semantics, fp32 contract."""

from __future__ import annotations

import pytest
import torch

from widemoe.config import ModelConfig
from widemoe.model.router import Router, select_experts


def _cfg(**kw) -> ModelConfig:
    base = dict(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=16)
    base.update(kw)
    return ModelConfig(**base)


def _sorted(ids: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order within a row is unspecified (sorted=False top-k): compare rows sorted by expert id."""
    ids_s, perm = ids.sort(dim=-1)
    return ids_s, w.gather(1, perm)


def _check_parity(ours: Router, hf_router: torch.nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        hf_router.weight.copy_(ours.weight)
        if ours.e_score_correction_bias is not None:
            hf_router.e_score_correction_bias.copy_(ours.e_score_correction_bias)
    logits_hf, w_hf, ids_hf = hf_router(x)
    out = ours(x)
    torch.testing.assert_close(out.logits, logits_hf.float(), rtol=0, atol=0)
    ids_a, w_a = _sorted(out.topk_ids, out.topk_weights)
    ids_b, w_b = _sorted(ids_hf, w_hf.float())
    assert torch.equal(ids_a, ids_b)
    torch.testing.assert_close(w_a, w_b)


def test_deepseek_v3_parity_with_groups_and_bias():
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m

    hf_cfg = m.DeepseekV3Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                                topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True)
    cfg = _cfg(n_group=4, topk_group=2, routed_scaling_factor=2.5, scoring_func="sigmoid",
               topk_method="noaux_tc")
    torch.manual_seed(0)
    ours = Router(cfg)
    ours.weight.data.normal_(std=0.3)
    ours.e_score_correction_bias.normal_(std=0.2)  # a real bias that moves selections
    _check_parity(ours, m.DeepseekV3TopkRouter(hf_cfg), torch.randn(64, 32))


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_deepseek_v2_parity(method):
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m

    hf_cfg = m.DeepseekV2Config(hidden_size=32, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                                topk_group=2, routed_scaling_factor=16.0, topk_method=method)
    cfg = _cfg(n_group=4, topk_group=2, routed_scaling_factor=16.0, scoring_func="softmax",
               topk_method=method, norm_topk_prob=False)
    torch.manual_seed(1)
    ours = Router(cfg)
    ours.weight.data.normal_(std=0.3)
    assert ours.e_score_correction_bias is None
    _check_parity(ours, m.DeepseekV2TopkRouter(hf_cfg), torch.randn(64, 32))


@pytest.mark.parametrize("family,norm", [("qwen3_moe", True), ("qwen3_moe", False), ("mixtral", True),
                                         ("olmoe", False)])
def test_softmax_family_parity(family, norm):
    import importlib

    m = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    if family == "qwen3_moe":
        hf = m.Qwen3MoeTopKRouter(m.Qwen3MoeConfig(hidden_size=32, num_experts=16, num_experts_per_tok=4,
                                                   norm_topk_prob=norm))
    elif family == "mixtral":  # Mixtral always renormalises
        hf = m.MixtralTopKRouter(m.MixtralConfig(hidden_size=32, num_local_experts=16, num_experts_per_tok=4))
    else:
        hf = m.OlmoeTopKRouter(m.OlmoeConfig(hidden_size=32, num_experts=16, num_experts_per_tok=4,
                                             norm_topk_prob=norm))
    cfg = _cfg(scoring_func="softmax", topk_method="greedy", norm_topk_prob=norm)
    torch.manual_seed(2)
    ours = Router(cfg)
    ours.weight.data.normal_(std=0.3)
    _check_parity(ours, hf, torch.randn(64, 32))


def test_sqrtsoftplus_matches_deepseek_v4_formula():
    cfg = _cfg(scoring_func="sqrtsoftplus", topk_method="noaux_tc", routed_scaling_factor=1.5)
    torch.manual_seed(3)
    r = Router(cfg)
    r.weight.data.normal_(std=0.3)
    r.e_score_correction_bias.normal_(std=0.1)
    x = torch.randn(32, 32)
    out = r(x)
    s = torch.nn.functional.softplus(x @ r.weight.t()).sqrt()
    ids = torch.topk(s + r.e_score_correction_bias, 4, dim=-1).indices
    w = s.gather(1, ids)
    w = w / (w.sum(-1, keepdim=True) + 1e-20) * 1.5
    a, wa = _sorted(out.topk_ids, out.topk_weights)
    b, wb = _sorted(ids, w)
    assert torch.equal(a, b)
    torch.testing.assert_close(wa, wb)


def test_dropped_groups_are_minus_inf_not_zero():
    # Two groups of two experts. Group 1 wins (top-2 sum); group 0 must be unreachable even though the
    # bias makes every selection score of the kept group negative: a 0.0 mask would pick group 0.
    sel = torch.tensor([[-0.9, -0.95, -0.1, -0.2]])
    ids = select_experts(sel, k=2, topk_method="noaux_tc", n_group=2, topk_group=1)
    assert sorted(ids[0].tolist()) == [2, 3]
    # the same through the Router: sigmoid scores are in (0, 1), a bias of -2 makes s + b negative
    cfg = _cfg(hidden_size=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1)
    r = Router(cfg)
    r.weight.data.zero_()
    r.e_score_correction_bias.copy_(torch.tensor([-2.0, -2.0, -1.0, -1.0]))
    out = r(torch.randn(8, 8))
    assert (out.topk_ids >= 2).all()


def test_group_limited_greedy_uses_group_max():
    # group 0 = {0.5, 0.0}: max 0.5, top-2 sum 0.5; group 1 = {0.3, 0.3}: max 0.3, top-2 sum 0.6
    sel = torch.tensor([[0.5, 0.0, 0.3, 0.3]])
    assert sorted(select_experts(sel, 1, "group_limited_greedy", 2, 1)[0].tolist()) == [0]
    assert sorted(select_experts(sel, 1, "noaux_tc", 2, 1)[0].tolist()) in ([2], [3])


def test_bias_changes_selection_never_weights():
    cfg = _cfg(routed_scaling_factor=2.0)
    torch.manual_seed(4)
    r = Router(cfg)
    r.weight.data.normal_(std=0.3)
    x = torch.randn(128, 32)
    before = r(x)
    r.e_score_correction_bias[3] = 10.0  # expert 3 now always selected
    after = r(x)
    assert (after.topk_ids == 3).any(-1).all()
    assert not torch.equal(before.topk_ids.sort(-1).values, after.topk_ids.sort(-1).values)
    torch.testing.assert_close(after.scores, before.scores, rtol=0, atol=0)
    # weights are the renormalised *unbiased* scores of the chosen experts
    w = after.scores.gather(1, after.topk_ids)
    torch.testing.assert_close(after.topk_weights, 2.0 * w / w.sum(-1, keepdim=True))


@pytest.mark.parametrize("k", [1, 2, 8, 16])
def test_each_token_gets_k_distinct_experts(k):
    cfg = _cfg(n_routed_experts=32, num_experts_per_tok=k, n_group=4, topk_group=2 if k <= 16 else 4)
    torch.manual_seed(k)
    r = Router(cfg)
    r.e_score_correction_bias.normal_()
    out = r(torch.randn(50, 32))
    assert out.topk_ids.shape == (50, k) and out.topk_weights.shape == (50, k)
    assert out.topk_ids.dtype == torch.int64 and out.topk_weights.dtype == torch.float32
    for row in out.topk_ids.tolist():
        assert len(set(row)) == k
    # group limit: every token's experts lie in at most topk_group groups
    groups = (out.topk_ids // 8).tolist()
    assert all(len(set(g)) <= cfg.topk_group for g in groups)
    torch.testing.assert_close(out.topk_weights.sum(-1), torch.ones(50))


def test_stays_fp32_when_cast_to_bf16():
    cfg = _cfg()
    r = Router(cfg)
    r.e_score_correction_bias.fill_(0.25)
    wrapper = torch.nn.Sequential(r, torch.nn.Linear(4, 4))
    wrapper.to(torch.bfloat16)
    assert r.weight.dtype == torch.float32
    assert r.e_score_correction_bias.dtype == torch.float32
    assert wrapper[1].weight.dtype == torch.bfloat16
    assert "0.e_score_correction_bias" in wrapper.state_dict()
    out = r(torch.randn(4, 32, dtype=torch.bfloat16))
    assert out.logits.dtype == out.scores.dtype == out.topk_weights.dtype == torch.float32
    r.half()
    assert r.weight.dtype == torch.float32


def test_gradient_reaches_gate_weight_only_through_weights():
    cfg = _cfg()
    r = Router(cfg)
    x = torch.randn(16, 32, requires_grad=True)
    out = r(x)
    out.topk_weights.sum().backward()  # renormalised to 1 per token: grad ~ 0 (sum is constant)
    assert r.weight.grad is not None and r.weight.grad.abs().max() < 1e-5
    r.weight.grad = None
    r(x).topk_weights[:, 0].sum().backward()
    assert r.weight.grad.abs().max() > 0
