"""DeepSeek-V4 blocks one by one: Sinkhorn paths, the experts' decode path, config rules, presets, cost."""

from __future__ import annotations

import pytest
import torch

from widemoe.config import ConfigError
from widemoe.cost import PUBLISHED_V4, check_published, count_params, kv_bytes, v4_kv_growth_per_token
from widemoe.model.deepseek_v4 import HyperConnection, V4Experts, _sinkhorn_lists, sinkhorn
from widemoe.model.experts import RoutedExperts
from widemoe.presets import get_preset

SW, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"


def test_sinkhorn_python_path_equals_tensor_path() -> None:
    comb = torch.rand(1, 1, 4, 4) + 0.05
    mT = comb[0, 0].t().tolist()  # the Python-float path takes the matrix transposed
    small = torch.tensor(_sinkhorn_lists(mT, 20, 1e-6), dtype=comb.dtype).view(comb.shape)
    big = sinkhorn(comb.expand(1, 9, 4, 4).clone(), 20, 1e-6)[:, :1]  # nine: the tensor path
    assert small.shape == comb.shape
    assert (small - big).abs().max().item() < 1e-6
    # approximately doubly stochastic after 20 iterations; columns exactly normalised last
    assert torch.allclose(small.sum(-2), torch.ones(1, 1, 4), atol=1e-5)
    assert torch.allclose(small.sum(-1), torch.ones(1, 1, 4), atol=1e-3)


def test_hyper_connection_weights() -> None:
    c = get_preset("v4-tiny")
    hc = HyperConnection(c)
    torch.nn.init.normal_(hc.fn, std=0.02)
    X = torch.randn(2, 3, c.hc_mult, c.hidden_size)
    post, comb, collapsed = hc(X)
    assert post.shape == (2, 3, 4) and bool(((post > 0) & (post < 2)).all())
    assert comb.shape == (2, 3, 4, 4)
    assert collapsed.shape == (2, 3, c.hidden_size)


@pytest.mark.parametrize("N", [1, 3])
def test_experts_decode_path_equals_dispatch(N: int) -> None:
    c = get_preset("v4-tiny")
    torch.manual_seed(0)
    fast = V4Experts(c)
    ref = RoutedExperts(c)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(N, c.hidden_size)
    ids = torch.stack([torch.randperm(c.n_routed_experts)[: c.num_experts_per_tok] for _ in range(N)])
    w = torch.rand(N, c.num_experts_per_tok)
    with torch.no_grad():
        y_fast, dropped = fast(x, ids, w)
        y_ref, _ = ref(x, ids, w)
    assert dropped == 0
    assert (y_fast - y_ref).abs().max().item() < 1e-6


def test_v4_config_rules() -> None:
    base = get_preset("v4-tiny")
    with pytest.raises(ConfigError, match="layer_types has 3 entries"):
        base.replace(layer_types=(SW, CSA, HCA))
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        base.replace(num_key_value_heads=2)
    with pytest.raises(ConfigError, match="o_groups"):
        base.replace(o_groups=3)
    with pytest.raises(ConfigError, match="sliding_window"):
        base.replace(sliding_window=None)
    with pytest.raises(ConfigError, match="no dense layers"):
        base.replace(first_k_dense_replace=1)
    with pytest.raises(ConfigError, match="only read by model_type='deepseek_v4'"):
        get_preset("micro").replace(num_hash_layers=1)


def test_presets_have_the_published_schedules() -> None:
    flash, pro = get_preset("deepseek-v4-flash"), get_preset("deepseek-v4-pro")
    assert [flash.v4_layer_types.count(t) for t in (SW, CSA, HCA)] == [2, 21, 20]
    assert [pro.v4_layer_types.count(t) for t in (SW, CSA, HCA)] == [0, 30, 31]
    assert flash.v4_layer_types[2] == CSA and pro.v4_layer_types[:2] == (HCA, HCA)
    assert (flash.num_hash_layers, flash.index_topk, pro.index_topk, pro.o_groups) == (3, 512, 1024, 16)


def test_cost_reproduces_published_counts_and_kv() -> None:
    flash, pro = get_preset("deepseek-v4-flash"), get_preset("deepseek-v4-pro")
    assert round(count_params(flash).main_total / 1e9, 1) == 284.3
    assert round(count_params(pro).active_without_embedding / 1e9, 2) == 48.85
    for fig in PUBLISHED_V4:
        assert check_published(fig)["status"] in ("within 1%", "at published precision")
    assert v4_kv_growth_per_token(flash) == 21 * 160 + 20 * 4
    gib = kv_bytes(flash, 1 << 20, 1, "bf16") / 2**30
    assert 6.70 < gib < 6.75  # ≈ 6.72 GiB compressed + ~5 MiB of sliding windows
    v3 = kv_bytes(get_preset("deepseek-v3"), 1 << 20, 1, "bf16") / 2**30
    assert gib < 0.1 * v3


@pytest.mark.parametrize("impl", ["loop", "threads", "gmm", "autograd"])
def test_routed_swiglu_clamp_on_every_path(impl: str) -> None:
    # D=32, I=16: aligned for _grouped_mm; weights large enough that about half the activations clamp.
    from oracles import reference_moe

    c = get_preset("v4-tiny").replace(hidden_size=32, moe_intermediate_size=16, n_routed_experts=4,
                                      num_experts_per_tok=2, swiglu_limit=1.0)
    torch.manual_seed(0)
    ex = RoutedExperts(c)
    ex.impl = impl
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.5)
    x = torch.randn(24, 32, requires_grad=True)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(24)])
    w = torch.rand(24, 2, requires_grad=True)
    assert (x @ ex.gate_up_proj[0].t()).abs().gt(1.0).float().mean() > 0.2  # the clamp binds
    y, _ = ex(x, ids, w)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, ex.gate_up_proj, ex.down_proj), g)
    ref = reference_moe(x, ex.gate_up_proj, ex.down_proj, ids, w, swiglu_limit=1.0)
    ref_grads = torch.autograd.grad(ref, (x, w, ex.gate_up_proj, ex.down_proj), g)
    assert (y - ref).abs().max().item() < 1e-5
    for a, b in zip(grads, ref_grads, strict=True):
        assert (a - b).abs().max().item() < 1e-4
    with torch.no_grad():  # and the no-grad paths
        assert (ex(x, ids, w)[0] - ref).abs().max().item() < 1e-5
    unclamped = reference_moe(x, ex.gate_up_proj, ex.down_proj, ids, w)
    assert (unclamped - ref).abs().max().item() > 1e-2


def test_hyper_connection_decode_path_equals_tensor_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import widemoe.model.deepseek_v4 as d4

    c = get_preset("v4-tiny")
    torch.manual_seed(0)
    hc = HyperConnection(c)
    with torch.no_grad():
        torch.nn.init.normal_(hc.fn, std=0.05)
        hc.base.normal_(std=1.0)
        hc.scale.uniform_(0.5, 2.0)
    X = torch.randn(1, 2, c.hc_mult, c.hidden_size)
    with torch.no_grad():
        small = hc(X)  # 2 tokens: Python floats
        monkeypatch.setattr(d4, "_SMALL_HC", 0)
        big = hc(X)  # tensor ops only
    for a, b in zip(small, big):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() < 2e-6


def test_experts_decode_path_applies_the_clamp() -> None:
    c = get_preset("v4-tiny")
    assert c.swiglu_limit is not None
    torch.manual_seed(1)
    fast = V4Experts(c)
    torch.nn.init.normal_(fast.gate_up_proj, std=0.5)
    torch.nn.init.normal_(fast.down_proj, std=0.1)
    ref = RoutedExperts(c)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(1, c.hidden_size) * 3  # pre-activations far beyond the limit
    ids = torch.randperm(c.n_routed_experts)[: c.num_experts_per_tok][None]
    w = torch.rand(1, c.num_experts_per_tok)
    with torch.no_grad():
        h = torch.einsum("kfd,d->kf", fast.gate_up_proj[ids[0]], x[0])
        assert bool((h.abs() > c.swiglu_limit).any())  # the clamp is active in this test
        y_fast, _ = fast(x, ids, w)
        y_ref, _ = ref(x, ids, w)
    assert (y_fast - y_ref).abs().max().item() < 1e-4 * y_ref.abs().max().item()
