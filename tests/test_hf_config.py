"""HF config.json <-> ModelConfig, checked against transformers 5.24's own config classes."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from widemoe.config import ConfigError  # noqa: E402
from widemoe.hf import detect_family, hf_to_model_config, model_config_to_hf  # noqa: E402
from widemoe.presets import get_preset  # noqa: E402

YARN = {
    "type": "yarn",
    "factor": 40.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def _v3_legacy() -> dict:
    """A DeepSeek-V3 config.json as the release ships it (legacy rope fields, remote-code keys)."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "n_shared_experts": 1,
        "n_routed_experts": 256,
        "routed_scaling_factor": 2.5,
        "kv_lora_rank": 512,
        "q_lora_rank": 1536,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "qk_nope_head_dim": 128,
        "topk_method": "noaux_tc",
        "n_group": 8,
        "topk_group": 4,
        "num_experts_per_tok": 8,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "aux_loss_alpha": 0.001,
        "seq_aux": True,
        "hidden_act": "silu",
        "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-06,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "rope_theta": 10000,
        "rope_scaling": {**YARN, "factor": 40},
        "num_nextn_predict_layers": 1,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "ep_size": 1,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        },
    }


def test_legacy_deepseek_v3_config_maps_to_the_preset() -> None:
    cfg, notices = hf_to_model_config(_v3_legacy())
    want = get_preset("deepseek-v3")
    assert cfg.replace(aux_loss_alpha=want.aux_loss_alpha) == want
    assert cfg.aux_loss_alpha == 0.001
    assert any("auto_map" in n for n in notices)


def test_v5_rope_parameters_equal_legacy_form() -> None:
    legacy = _v3_legacy()
    v5 = dict(legacy)
    del v5["rope_theta"], v5["rope_scaling"]
    v5["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        **{k: v for k, v in YARN.items() if k != "type"},
    }
    assert hf_to_model_config(v5)[0] == hf_to_model_config(legacy)[0]


@pytest.mark.parametrize(
    "cls,kw",
    [
        (
            "DeepseekV3Config",
            dict(
                n_group=4,
                topk_group=2,
                n_routed_experts=16,
                rope_scaling=YARN,
                max_position_embeddings=163840,
            ),
        ),
        (
            "DeepseekV2Config",
            dict(
                q_lora_rank=None,
                n_routed_experts=64,
                num_experts_per_tok=6,
                topk_method="group_limited_greedy",
                n_group=8,
                topk_group=3,
                routed_scaling_factor=16.0,
            ),
        ),
        (
            "Qwen3MoeConfig",
            dict(num_experts=16, decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=True),
        ),
        ("MixtralConfig", dict(num_local_experts=8)),
        ("OlmoeConfig", dict(num_experts=16)),
    ],
)
def test_round_trip_through_transformers_config_classes(cls: str, kw: dict, tmp_path) -> None:
    hf_cfg = getattr(transformers, cls)(num_hidden_layers=6, **kw)
    cfg, _ = hf_to_model_config(hf_cfg.to_dict())
    out = model_config_to_hf(cfg)
    (tmp_path / "config.json").write_text(json.dumps(out))
    rebuilt = transformers.AutoConfig.from_pretrained(tmp_path)  # transformers constructs from our file
    assert type(rebuilt).__name__ == cls
    assert hf_to_model_config(rebuilt.to_dict())[0] == cfg
    for field in ("hidden_size", "num_hidden_layers", "num_experts_per_tok", "rms_norm_eps"):
        assert getattr(rebuilt, field) == getattr(hf_cfg, field)


def test_family_semantics() -> None:
    q = transformers.Qwen3MoeConfig(
        num_hidden_layers=6, num_experts=8, decoder_sparse_step=2, mlp_only_layers=[3]
    )
    cfg, _ = hf_to_model_config(q.to_dict())
    assert cfg.moe_layer_indices == [1, 5]  # (i+1) % 2 == 0 and not in mlp_only_layers
    assert cfg.qk_norm == "head" and not cfg.rope_interleave and cfg.n_routed_experts == 8
    assert hf_to_model_config(transformers.MixtralConfig(num_hidden_layers=2).to_dict())[0].norm_topk_prob
    o, _ = hf_to_model_config(transformers.OlmoeConfig(num_hidden_layers=2).to_dict())
    assert o.qk_norm == "full" and not o.norm_topk_prob and o.moe_intermediate_size == o.intermediate_size
    v2 = transformers.DeepseekV2Config(
        num_hidden_layers=2, num_experts_per_tok=6, norm_topk_prob=True
    ).to_dict()
    cfg, notices = hf_to_model_config(v2)
    assert cfg.norm_topk_prob is False and cfg.rope_interleave and cfg.scoring_func == "softmax"
    assert any("norm_topk_prob" in n for n in notices)


def test_kimi_k2_is_deepseek_v3_architecture() -> None:
    d = _v3_legacy()
    d.update(model_type="kimi_k2", n_group=1, topk_group=1, n_routed_experts=384)
    assert detect_family(d) == "deepseek_v3"
    cfg, _ = hf_to_model_config(d)
    assert cfg.model_type == "kimi_k2"
    out = model_config_to_hf(cfg)
    assert out["model_type"] == "deepseek_v3" and out["architectures"] == ["DeepseekV3ForCausalLM"]
    assert hf_to_model_config(out)[0].model_type == "kimi_k2"


@pytest.mark.parametrize(
    "change,field",
    [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"moe_layer_freq": 2}, "moe_layer_freq"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope type 'dynamic'"),
        ({"attention_bias": True}, "attention_bias"),
        ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "model_type='llama'"),
    ],
)
def test_unsupported_values_are_errors_naming_the_field(change: dict, field: str) -> None:
    d = {**_v3_legacy(), **change}
    with pytest.raises(ConfigError, match=field):
        hf_to_model_config(d)


@pytest.mark.parametrize(
    "cls,kw,field",
    [
        ("MixtralConfig", dict(sliding_window=4096), "sliding_window"),
        ("OlmoeConfig", dict(clip_qkv=8.0), "clip_qkv"),
        ("Qwen3MoeConfig", dict(use_sliding_window=True), "use_sliding_window"),
    ],
)
def test_unsupported_gqa_family_values(cls: str, kw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        hf_to_model_config(getattr(transformers, cls)(num_hidden_layers=2, **kw).to_dict())


def test_export_refuses_what_the_family_cannot_express() -> None:
    cfg = get_preset("micro", scoring_func="softmax", topk_method="greedy")
    with pytest.raises(ConfigError, match="scoring_func='softmax'"):
        model_config_to_hf(cfg)


def test_widemoe_only_fields_round_trip() -> None:
    cfg = get_preset("micro", capacity_factor=1.25, bias_update_speed=5e-4, mtp_loss_weight=0.1)
    out = model_config_to_hf(cfg)
    assert out["widemoe"]["capacity_factor"] == 1.25
    assert hf_to_model_config(out)[0] == cfg


# --- wrong-typed values in config.json (issue 11 defect 6): the key, the value and the type are named


def _v4(layout: str = "transformers") -> dict:
    return model_config_to_hf(get_preset("deepseek-v4-flash"), layout=layout)


def _qwen3() -> dict:
    return transformers.Qwen3MoeConfig(num_hidden_layers=2, num_experts=8).to_dict()


def _v2() -> dict:
    return transformers.DeepseekV2Config(num_hidden_layers=2, num_experts_per_tok=6).to_dict()


def _olmoe() -> dict:
    return transformers.OlmoeConfig(num_hidden_layers=2).to_dict()


def _mixtral() -> dict:
    return transformers.MixtralConfig(num_hidden_layers=2).to_dict()


_WRONG_TYPES = [
    # explicit nulls that used to crash float() or become False through bool()
    (_v3_legacy, {"routed_scaling_factor": None}, r"routed_scaling_factor=None must be a number, not null"),
    (_v3_legacy, {"aux_loss_alpha": None}, r"aux_loss_alpha=None must be a number, not null"),
    (_v3_legacy, {"norm_topk_prob": None}, r"norm_topk_prob=None must be a boolean .*not null"),
    (_v3_legacy, {"rope_interleave": None}, r"rope_interleave=None must be a boolean .*not null"),
    (_qwen3, {"router_aux_loss_coef": None}, r"router_aux_loss_coef=None must be a number, not null"),
    (_qwen3, {"norm_topk_prob": None}, r"norm_topk_prob=None must be a boolean .*not null"),
    (_olmoe, {"norm_topk_prob": None}, r"norm_topk_prob=None must be a boolean .*not null"),
    # raw flags read by truthiness: "false" is not false
    (_v3_legacy, {"attention_bias": "false"}, r"attention_bias='false' must be a boolean .*not a string"),
    (_v3_legacy, {"mlp_bias": "false"}, r"mlp_bias='false' must be a boolean .*not a string"),
    (_qwen3, {"mlp_bias": "false"}, r"mlp_bias='false' must be a boolean .*not a string"),
    (_qwen3, {"use_sliding_window": "false"}, r"use_sliding_window='false' must be a boolean .*not a string"),
    (_v2, {"norm_topk_prob": "false"}, r"norm_topk_prob='false' must be a boolean .*not a string"),
    (_v2, {"num_nextn_predict_layers": "0"}, r"num_nextn_predict_layers='0' must be an integer"),
    (_v3_legacy, {"moe_layer_freq": "1"}, r"moe_layer_freq='1' must be an integer"),
    (_v3_legacy, {"attention_dropout": "0.0"}, r"attention_dropout='0.0' must be a number"),
    (_qwen3, {"decoder_sparse_step": "2"}, r"decoder_sparse_step='2' must be an integer"),
    (_mixtral, {"router_jitter_noise": "0"}, r"router_jitter_noise='0' must be a number"),
    # DeepSeek-V4: its reads go through the same type pass
    (_v4, {"hc_mult": "4"}, r"hc_mult='4' must be an integer, not a string"),
    (_v4, {"num_hidden_layers": True}, r"num_hidden_layers=True must be an integer, not a boolean"),
    (_v4, {"tie_word_embeddings": "false"}, r"tie_word_embeddings='false' must be a boolean .*not a string"),
    (_v4, {"routed_scaling_factor": "1.5"}, r"routed_scaling_factor='1.5' must be a number, not a string"),
    (_v4, {"hc_eps": float("nan")}, r"hc_eps=nan must be a finite number"),
    (_v4, {"head_dim": 512.0}, r"head_dim=512.0 must be an integer"),
    (_v4, {"partial_rotary_factor": "0.125"}, r"partial_rotary_factor='0.125' must be a number"),
    (_v4, {"output_router_logits": "false"}, r"output_router_logits='false' must be a boolean"),
    (_v4, {"num_key_value_heads": "1"}, r"num_key_value_heads='1' must be an integer"),
    (
        _v4,
        {"compress_rates": {"compressed_sparse_attention": "4"}},
        r"compress_rates\.compressed_sparse_attention='4' must be an integer",
    ),
    (lambda: _v4("native"), {"qk_rope_head_dim": "64"}, r"qk_rope_head_dim='64' must be an integer"),
    (lambda: _v4("native"), {"num_hash_layers": 3.0}, r"num_hash_layers=3.0 must be an integer"),
    (lambda: _v4("native"), {"compress_rate_hca": True}, r"compress_rate_hca=True must be an integer"),
    (lambda: _v4("native"), {"compress_ratios": [False] * 44}, r"compress_ratios=.* must be a list of int"),
]


@pytest.mark.parametrize("base,change,message", _WRONG_TYPES)
def test_wrong_typed_values_are_named_with_key_value_and_type(base, change: dict, message: str) -> None:  # noqa: ANN001
    d = {**base(), **change}
    with pytest.raises(ConfigError, match=r"^x/config\.json: " + message):
        hf_to_model_config(d, source="x/config.json")


def test_valid_v4_configs_read_as_before() -> None:
    want = get_preset("deepseek-v4-flash")
    for layout in ("transformers", "native"):
        assert hf_to_model_config(_v4(layout), source="x/config.json")[0] == want
