"""The whole decoder: meta builds, losses reported apart, MTP targets, cached decoding vs full forward."""

import pytest
import torch
import torch.nn.functional as F

from widemoe.model.causal_lm import IGNORE_INDEX, build_model
from widemoe.presets import PRESET_NAMES, get_preset

torch.set_num_threads(2)


def gqa_micro(**kw):
    base = dict(
        model_type="qwen3_moe",
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        scoring_func="softmax",
        topk_method="greedy",
        norm_topk_prob=True,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        qk_norm="head",
        rope_interleave=False,
        rope_theta=10000.0,
        max_position_embeddings=128,
        eos_token_id=0,
        bos_token_id=None,
    )
    base.update(kw)
    from widemoe.config import ModelConfig

    return ModelConfig(**base)


CONFIGS = {
    "micro-mla": lambda: get_preset("micro"),
    "micro-mla-noqlora": lambda: get_preset(
        "micro",
        q_lora_rank=None,
        scoring_func="softmax",
        topk_method="greedy",
        norm_topk_prob=False,
        n_group=1,
        topk_group=1,
    ),
    "micro-gqa-headnorm": lambda: gqa_micro(),
    "micro-gqa-fullnorm": lambda: gqa_micro(qk_norm="full", num_key_value_heads=4),
}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_builds_on_meta_without_memory(name):
    model = build_model(get_preset(name), device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.num_parameters() > 0


def test_deepseek_v3_meta_count_matches_published_total():
    n = build_model(get_preset("deepseek-v3", num_nextn_predict_layers=0), device="meta").num_parameters()
    assert abs(n / 671.03e9 - 1) < 0.005  # recomputed total in shared/reference/architecture.md (g)


def test_losses_are_reported_apart_and_sum_up():
    cfg = get_preset("micro", aux_loss_alpha=0.01, router_aux_loss_coef=0.02, router_z_loss_coef=0.001)
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    out = model(ids[:, :-1], labels=ids[:, 1:])
    assert set(out.aux_losses) == {"seq_aux", "switch_aux", "z_loss"}
    expected = (
        out.lm_loss
        + cfg.mtp_loss_weight * out.mtp_loss
        + 0.01 * out.aux_losses["seq_aux"]
        + 0.02 * out.aux_losses["switch_aux"]
        + 0.001 * out.aux_losses["z_loss"]
    )
    torch.testing.assert_close(out.loss, expected)
    # Routing info for both main MoE layers and the MTP block.
    assert len(out.routing) == len(cfg.moe_layer_indices) + cfg.num_nextn_predict_layers
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []


def test_no_aux_losses_when_disabled():
    model = build_model(get_preset("micro"), seed=0)
    ids = torch.randint(0, 256, (1, 9))
    out = model(ids[:, :-1], labels=ids[:, 1:])
    assert out.aux_losses == {}
    torch.testing.assert_close(out.loss, out.lm_loss + 0.3 * out.mtp_loss)


def test_mtp_predicts_two_ahead_from_shifted_embeddings():
    """Recompute the depth-1 MTP loss by hand: position i embeds t_{i+1} and predicts t_{i+2}."""
    cfg = get_preset("micro")
    model = build_model(cfg, seed=1).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    x, y = ids[:, :-1], ids[:, 1:]
    out = model(x, labels=y)
    h = out.hidden_states
    m = model.model.mtp[0]
    T = x.shape[1]
    cos, sin = model.model.rotary_emb(torch.arange(T).expand(2, T))
    mask = torch.ones(T, T, dtype=torch.bool).tril().expand(2, T, T)
    hk, _ = m(h, model.model.embed_tokens(y), cos, sin, mask, y)
    logits = model.lm_head(m.shared_head_norm(hk))
    target = torch.cat([y[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    ref = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.mtp_loss, ref)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_decoding_equals_full_forward_past_original_length(name):
    cfg = CONFIGS[name]()
    model = build_model(cfg, seed=0).eval()
    T = 48  # micro's YaRN original length is 32: decode past it
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        step = [model(ids[:, :20], cache=cache).logits]
        step.append(model(ids[:, 20:27], cache=cache).logits)  # chunked prefill
        for t in range(27, T):
            step.append(model(ids[:, t : t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(step, dim=1), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["micro-mla", "micro-gqa-headnorm"])
def test_left_padding_gives_same_logits_as_alone(name):
    cfg = CONFIGS[name]()
    model = build_model(cfg, seed=0).eval()
    a = torch.randint(1, cfg.vocab_size, (1, 10))
    b = torch.randint(1, cfg.vocab_size, (1, 6))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], dim=1)])
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, :4] = False
    with torch.no_grad():
        both = model(batch, attention_mask=mask).logits
        alone_a = model(a).logits
        alone_b = model(b).logits
    torch.testing.assert_close(both[0], alone_a[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(both[1, 4:], alone_b[0], atol=2e-5, rtol=1e-4)


def test_bf16_model_routes_like_fp32():
    cfg = get_preset("micro")
    m32 = build_model(cfg, seed=0).eval()
    m16 = build_model(cfg, seed=0, dtype=torch.bfloat16).eval()
    for blk in m16.moe_blocks():
        assert blk.gate.weight.dtype == torch.float32
    ids = torch.randint(0, cfg.vocab_size, (4, 32))
    with torch.no_grad():
        r32 = m32(ids).routing
        r16 = m16(ids).routing
    same = [
        (a.topk_ids.sort(-1).values == b.topk_ids.sort(-1).values).all(-1).float().mean().item()
        for a, b in zip(r32, r16)
    ]
    assert min(same) > 0.9, same


def test_tied_embeddings_share_storage():
    model = build_model(get_preset("micro", tie_word_embeddings=True), seed=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_decoder_skeleton_imports_no_family_module():
    """model/transformer.py is the generic body: DeepSeek-V4 plugs in through causal_lm.BODIES."""
    import grimp

    graph = grimp.build_graph("widemoe")
    for family in ("widemoe.model.deepseek_v4", "widemoe.model.v4_attention", "widemoe.model.v4_cache"):
        assert not graph.chain_exists("widemoe.model.transformer", family)
    assert graph.chain_exists("widemoe.model.causal_lm", "widemoe.model.deepseek_v4")
