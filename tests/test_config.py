"""ModelConfig: validation errors name the field and the rule; presets carry published dimensions."""

import json
import math
import re

import pytest

from widemoe.config import FAMILY_RULES, ConfigError, ModelConfig
from widemoe.hf import hf_to_model_config, model_config_to_hf
from widemoe.hf.families.common import WIDEMOE_ONLY
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


# --- one type pass over every field, from every source (issue 11, defect 6) --------------------------

_NAN, _INF = float("nan"), float("inf")
_ALL = ("kwargs", "replace", "json", "toml", "hf")
_NO_TOML = ("kwargs", "replace", "json", "hf")  # TOML has no null
_WIDEMOE = ("kwargs", "replace", "json", "toml")  # fields a DeepSeek-V3 config.json does not carry
_NULL = ("kwargs", "replace", "json")  # a null the HF reader takes as "the family's default"

# (field, wrong value, message (regex), sources); each message names the field, the value and the type
_WRONG_TYPES = [
    ("num_hidden_layers", "4", r"num_hidden_layers='4' must be an integer, not a string", _ALL),
    ("num_hidden_layers", 2.5, r"num_hidden_layers=2\.5 must be an integer", _ALL),
    ("n_routed_experts", True, r"n_routed_experts=True must be an integer, not a boolean", _ALL),
    ("max_position_embeddings", None, r"max_position_embeddings=None must be an integer, not null", _NO_TOML),
    ("q_lora_rank", "48", r"q_lora_rank='48' must be an integer or null, not a string", _ALL),
    ("eos_token_id", False, r"eos_token_id=False must be an integer or null, not a boolean", _ALL),
    ("norm_topk_prob", "false", r"norm_topk_prob='false' must be a boolean \(true or false\), not a string",
     _ALL),
    ("tie_word_embeddings", "false", r"tie_word_embeddings='false' must be a boolean \(true or false\)",
     _ALL),
    ("rope_interleave", 0, r"rope_interleave=0 must be a boolean \(true or false\), not an integer", _ALL),
    ("norm_topk_prob", None, r"norm_topk_prob=None must be a boolean \(true or false\), not null", _NULL),
    ("routed_scaling_factor", "2.5", r"routed_scaling_factor='2.5' must be a number, not a string", _ALL),
    ("routed_scaling_factor", _NAN, r"routed_scaling_factor=nan must be a finite number", _ALL),
    ("routed_scaling_factor", True, r"routed_scaling_factor=True must be a number, not a boolean", _ALL),
    ("routed_scaling_factor", None, r"routed_scaling_factor=None must be a number, not null", _NULL),
    ("rms_norm_eps", _INF, r"rms_norm_eps=inf must be a finite number", _ALL),
    ("initializer_range", "0.02", r"initializer_range='0.02' must be a number, not a string", _ALL),
    ("capacity_factor", "1.5", r"capacity_factor='1.5' must be a number or null, not a string", _ALL),
    ("capacity_factor", _INF, r"capacity_factor=inf must be a finite number or null", _ALL),
    ("bias_update_speed", _NAN, r"bias_update_speed=nan must be a finite number", _ALL),
    ("scoring_func", 1, r"scoring_func=1 must be a string, not an integer", _ALL),
    ("topk_method", None, r"topk_method=None must be a string, not null", _NULL),
    ("mlp_only_layers", [0, "1"], r"mlp_only_layers=\[0, '1'\] must be a list of integers", _WIDEMOE),
    ("mlp_only_layers", "0", r"mlp_only_layers='0' must be a list of integers, not a string", _WIDEMOE),
    ("layer_types", [True], r"layer_types=\[True\] must be a list of strings", _WIDEMOE),
    ("rope_scaling", "yarn", r"rope_scaling='yarn' must be a mapping or null, not a string", _WIDEMOE),
    ("compress_rope_theta", "1e4", r"compress_rope_theta='1e4' must be a number, not a string", _WIDEMOE),
    ("sliding_window", 1.5, r"sliding_window=1\.5 must be an integer or null", _WIDEMOE),
]


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if v != v else "inf"
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)


def _build_from(source, field, value, tmp_path):
    """Build the micro preset with `field` set to `value` through one source."""
    if source == "kwargs":
        ModelConfig(**{**get_preset("micro").to_dict(), field: value})
    elif source == "replace":
        get_preset("micro").replace(**{field: value})
    elif source == "json":
        p = tmp_path / "m.json"
        p.write_text(json.dumps({"preset": "micro", field: value}))
        config_from_file(p)
    elif source == "toml":
        p = tmp_path / "m.toml"
        p.write_text(f'preset = "micro"\n{field} = {_toml_value(value)}\n')
        config_from_file(p)
    else:
        hf = model_config_to_hf(get_preset("micro"))
        if field in WIDEMOE_ONLY:
            hf["widemoe"] = {field: value}
        else:
            assert field in hf, field
            hf[field] = value
        p = tmp_path / "config.json"
        p.write_text(json.dumps(hf))
        hf_to_model_config(json.loads(p.read_text()), source=str(p))


@pytest.mark.parametrize(
    "source, field, value, message",
    [
        pytest.param(s, f, v, m, id=f"{s}-{f}={v!r}")
        for f, v, m, sources in _WRONG_TYPES
        for s in sources
    ],
)
def test_wrong_types_are_refused_naming_field_value_and_type(source, field, value, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as e:
        _build_from(source, field, value, tmp_path)
    name = {"json": "m.json", "toml": "m.toml", "hf": "config.json"}.get(source, "ModelConfig")
    assert str(e.value).startswith(f"{tmp_path / name}: " if name != "ModelConfig" else "ModelConfig: ")
    assert "\n" not in str(e.value)
    _build_from(source, "hidden_size", 64, tmp_path)  # the same source with a valid value builds


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rope_scaling": {"type": "yarn", "factor": True, "original_max_position_embeddings": 32}},
         r"rope_scaling.factor=True must be a finite number >= 1"),
        ({"rope_scaling": {"type": "yarn", "factor": _INF, "original_max_position_embeddings": 32}},
         r"rope_scaling.factor=inf must be a finite number >= 1"),
        ({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": True}},
         r"rope_scaling.original_max_position_embeddings=True must be a positive integer"),
        ({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32,
                           "beta_fast": "32"}},
         r"rope_scaling.beta_fast='32' must be a finite non-negative number"),
        ({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 32,
                           "mscale": _NAN}},
         r"rope_scaling.mscale=nan must be a finite non-negative number"),
    ],
)
def test_rope_scaling_entries_are_typed(changes, message):
    with pytest.raises(ConfigError, match=message):
        get_preset("micro", **changes)


def test_hf_config_json_values_are_typed_before_the_adapter_converts_them(tmp_path):
    hf = model_config_to_hf(get_preset("micro"))
    hf["rope_parameters"]["rope_theta"] = "10000"
    with pytest.raises(ConfigError, match=r"ck/config.json: rope_theta='10000' must be a number"):
        hf_to_model_config(hf, source="ck/config.json")
    hf = model_config_to_hf(get_preset("micro"))
    hf["rope_parameters"]["factor"] = "4"
    with pytest.raises(ConfigError, match=r"ck/config.json: rope_scaling.factor='4' must be a finite number"):
        hf_to_model_config(hf, source="ck/config.json")


def test_accepted_values_are_normalised_as_before(tmp_path):
    np = pytest.importorskip("numpy")
    c = get_preset("micro", routed_scaling_factor=2, rope_theta=np.float32(5e3),
                   num_hidden_layers=np.int64(4), mlp_only_layers=[], capacity_factor=1)
    assert c.routed_scaling_factor == 2.0 and type(c.routed_scaling_factor) is float
    assert type(c.rope_theta) is float and type(c.num_hidden_layers) is int and c.num_hidden_layers == 4
    assert c.capacity_factor == 1.0 and type(c.capacity_factor) is float and c.mlp_only_layers == ()
    assert json.loads(json.dumps(c.to_dict())) == c.to_dict()  # plain Python types only
    for name in PRESET_NAMES:  # every preset round-trips unchanged through JSON
        p = get_preset(name)
        assert ModelConfig.from_dict(json.loads(json.dumps(p.to_dict()))) == p
        assert ModelConfig.from_dict(json.loads(json.dumps(p.to_dict()))).to_dict() == p.to_dict()


def test_hf_required_field_given_as_null_names_the_type(tmp_path):
    hf = model_config_to_hf(get_preset("micro"))
    hf["num_hidden_layers"] = None
    message = r"ck/config.json: num_hidden_layers=None must be an integer, not null"
    with pytest.raises(ConfigError, match=message):
        hf_to_model_config(hf, source="ck/config.json")
    del hf["num_hidden_layers"]
    with pytest.raises(ConfigError, match=r"ck/config.json: required field 'num_hidden_layers' is missing"):
        hf_to_model_config(hf, source="ck/config.json")


@pytest.mark.parametrize("value", [["micro"], 3, None, {"name": "micro"}])
def test_preset_key_must_be_a_preset_name(value, tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"preset": value, "hidden_size": 64}))
    message = re.escape(f"m.json: preset={value!r} must be a string (a preset name)")
    with pytest.raises(ConfigError, match=message):
        config_from_file(p)
