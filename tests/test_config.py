"""ModelConfig: validation errors name the field and the rule; presets carry published dimensions."""

import json

import pytest

from widemoe.config import FAMILY_RULES, ConfigError, ModelConfig
from widemoe.presets import PRESET_NAMES, config_from_file, get_preset


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"num_experts_per_tok": 20, "n_routed_experts": 16, "n_group": 1, "topk_group": 1},
            "num_experts_per_tok=20 exceeds n_routed_experts=16",
        ),
        (
            {"n_routed_experts": 60, "n_group": 8, "topk_group": 4},
            "n_routed_experts=60 is not divisible by n_group=8",
        ),
        ({"topk_group": 5, "n_group": 4}, "topk_group=5 must be in [1, n_group=4]"),
        ({"num_experts_per_tok": 6, "n_group": 4, "topk_group": 2}, "kept groups cannot supply"),
        ({"scoring_func": "relu"}, "scoring_func='relu' must be one of"),
        ({"hidden_size": 0}, "hidden_size=0 must be a positive integer"),
        ({"first_k_dense_replace": 9}, "first_k_dense_replace=9 exceeds num_hidden_layers=3"),
        ({"qk_rope_head_dim": 7}, "qk_rope_head_dim=7 must be a positive even number"),
        ({"capacity_factor": 0.0}, "capacity_factor=0.0 must be > 0"),
        ({"eos_token_id": 999}, "eos_token_id=999 must be null or a token id in [0, vocab_size=256)"),
        ({"rope_scaling": {"type": "yarn", "factor": 4}}, "original_max_position_embeddings"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.type='linear' must be one of"),
        ({"aux_loss_alpha": -1.0}, "aux_loss_alpha=-1.0 must be finite and >= 0"),
    ],
)
def test_invalid_configs_name_field_and_rule(changes, message):
    with pytest.raises(
        ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        get_preset("micro", **changes)


def test_gqa_heads_must_divide():
    with pytest.raises(ConfigError, match="num_attention_heads=6 is not divisible by num_key_value_heads=4"):
        get_preset("qwen3-30b-a3b", num_attention_heads=6)


def test_group_routing_needs_two_experts_per_group():
    with pytest.raises(ConfigError, match="must be >= 2"):
        get_preset("micro", n_routed_experts=4, n_group=4, topk_group=4, num_experts_per_tok=2)


def test_replace_revalidates_and_rejects_unknown_fields():
    c = get_preset("micro")
    with pytest.raises(ConfigError, match="num_experts_per_tok=9 exceeds n_routed_experts=8"):
        c.replace(num_experts_per_tok=9, n_group=1, topk_group=1)
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['n_experts'\]"):
        c.replace(n_experts=4)


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'.*deepseek-v3"):
        get_preset("gpt5")


def test_presets_have_published_dimensions():
    v3 = get_preset("deepseek-v3")
    assert (v3.hidden_size, v3.num_hidden_layers, v3.n_routed_experts, v3.num_experts_per_tok) == (
        7168,
        61,
        256,
        8,
    )
    assert (v3.n_group, v3.topk_group, v3.routed_scaling_factor, v3.kv_lora_rank) == (8, 4, 2.5, 512)
    k2 = get_preset("kimi-k2")
    assert (k2.n_routed_experts, k2.n_group, k2.num_attention_heads, k2.vocab_size) == (384, 1, 64, 163840)
    assert k2.rope_scaling["beta_fast"] == 1
    lite = get_preset("deepseek-v2-lite")
    assert lite.q_lora_rank is None and lite.scoring_func == "softmax" and not lite.norm_topk_prob
    q3 = get_preset("qwen3-235b-a22b")
    assert (q3.hidden_size, q3.num_hidden_layers, q3.kv_heads, q3.qk_norm) == (4096, 94, 4, "head")
    assert not get_preset("mixtral-8x7b").is_mla
    assert get_preset("olmoe-1b-7b").qk_norm == "full"
    for name in PRESET_NAMES:
        assert get_preset(name).moe_layer_indices, name


def test_config_files_json_and_toml(tmp_path):
    j = tmp_path / "m.json"
    j.write_text(json.dumps({"preset": "micro", "n_routed_experts": 16}))
    assert config_from_file(j).n_routed_experts == 16
    t = tmp_path / "m.toml"
    t.write_text('preset = "tiny"\nnum_hidden_layers = 2\n')
    assert config_from_file(t).num_hidden_layers == 2
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        config_from_file(bad)
    unknown = tmp_path / "u.json"
    unknown.write_text(json.dumps({"hidden_size": 64, "n_expert": 3}))
    with pytest.raises(ConfigError, match=r"u.json: unknown config field\(s\) \['n_expert'\]"):
        config_from_file(unknown)


def test_preset_key_needs_the_preset_table(tmp_path):
    j = tmp_path / "m.json"
    j.write_text(json.dumps({"preset": "micro"}))
    with pytest.raises(ConfigError, match="m.json: 'preset' = 'micro' needs the preset table"):
        ModelConfig.from_file(j)  # config.py sits below presets.py; presets.config_from_file passes it
    assert ModelConfig.from_file(j, presets=get_preset) == get_preset("micro")


def test_family_rules_are_picked_by_model_type():
    assert FAMILY_RULES.keys() == {"deepseek_v4"}
    with pytest.raises(ConfigError, match="num_hash_layers=1 is only read by model_type='deepseek_v4'"):
        get_preset("micro", num_hash_layers=1)
    with pytest.raises(ConfigError, match="n_shared_experts=2 must be 0 or 1 for deepseek_v4"):
        get_preset("v4-tiny", n_shared_experts=2)


def test_round_trip_through_dict():
    c = get_preset("deepseek-v2-lite")
    assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
