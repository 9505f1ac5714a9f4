"""Tests of `widemoe.hf.resolve`: one model spec (preset, config file, HF directory, training run) resolved
to its config, weights and tokenizer, and loaded; errors are exceptions with clear messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tokenizers
import torch

from widemoe.config import ConfigError
from widemoe.cost import count_params, kv_bytes
from widemoe.data.tokenizer import TokenizerError
from widemoe.hf import model_config_to_hf, save_pretrained
from widemoe.hf.resolve import (
    MARKER,
    ResolvedModel,
    SpecError,
    committed_checkpoints,
    latest_checkpoint,
    load_model,
    load_tokenizer,
    resolve_model,
)
from widemoe.model.causal_lm import build_model
from widemoe.presets import get_preset

torch.set_num_threads(2)

# --- spec loading (moved from tests/test_cost.py, where they called cost.load_config) --------------------


def test_unknown_preset_names_the_presets() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'deepseek-v9'.*deepseek-v3"):
        resolve_model("deepseek-v9")


def test_malformed_config_json(tmp_path) -> None:
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json: not a readable JSON config"):
        resolve_model(str(bad))
    with pytest.raises(ConfigError, match="directory has no config.json"):
        resolve_model(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    "name", ["deepseek-v3", "deepseek-v2-lite", "qwen3-30b-a3b", "mixtral-8x7b", "olmoe-1b-7b"]
)
def test_hf_config_json_gives_the_preset_counts(name: str, tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(model_config_to_hf(get_preset(name))))
    c = resolve_model(str(tmp_path)).config  # a HF directory
    want, got = count_params(get_preset(name)), count_params(c)
    assert (
        got.total_with_mtp == want.total_with_mtp and got.active_with_embedding == want.active_with_embedding
    )
    assert kv_bytes(c, 1) == kv_bytes(get_preset(name), 1)


def test_config_without_sizes_is_an_error(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "qwen3_moe"}))
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['vocab_size', 'hidden_size'"):
        resolve_model(str(path))
    path.write_text(json.dumps({"preset": "micro", "num_hidden_layers": 2}))
    assert resolve_model(str(path)).config.num_hidden_layers == 2


def test_hf_config_unknown_family(tmp_path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match="model_type='llama'.*is not a supported family"):
        resolve_model(str(path))


# --- kinds of spec -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro() -> torch.nn.Module:
    return build_model(get_preset("micro"), seed=0).eval()


def _hf(config) -> dict:
    return model_config_to_hf(config)


def test_preset_and_config_file_are_random_models(tmp_path: Path) -> None:
    r = resolve_model("micro")
    assert (r.kind, r.weights, r.tokenizer) == ("preset", None, None)
    assert r.config == get_preset("micro")
    assert r.description == "randomly initialised micro (output is noise)"
    toml = tmp_path / "m.toml"
    toml.write_text('preset = "micro"\nnum_hidden_layers = 1\n')
    r = resolve_model(toml)
    assert (r.kind, r.weights, r.config.num_hidden_layers) == ("config", None, 1)


def test_checkpoint_directory_loads_its_weights(micro: torch.nn.Module, tmp_path: Path) -> None:
    save_pretrained(micro, tmp_path / "ckpt")
    r = resolve_model(str(tmp_path / "ckpt"))
    assert (r.kind, r.weights, r.tokenizer) == ("directory", tmp_path / "ckpt", None)
    assert _hf(r.config) == _hf(micro.config)
    assert r.description == f"checkpoint {tmp_path / 'ckpt'}"
    model, tok = load_model(r, seed=123)  # the seed only matters for a random model
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, micro(x).logits)
    assert tok.is_bytes and tok.encode("Hé") == [72, 195, 169] and tok.decode([72, 195, 169]) == "Hé"
    assert tok.eos_id == micro.config.eos_token_id


def test_a_directory_tokenizer_json_is_used(micro: torch.nn.Module, tmp_path: Path) -> None:
    save_pretrained(micro, tmp_path)
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"hello": 0, "world": 1, "?": 2}, unk_token="?"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    words.save(str(tmp_path / "tokenizer.json"))
    r = resolve_model(tmp_path)
    assert r.tokenizer == tmp_path
    tok = load_tokenizer(r)
    assert not tok.is_bytes and tok.encode("hello world moon") == [0, 1, 2]
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a readable tokenizer"):
        load_tokenizer(r)


def _fake_run(run: Path, micro: torch.nn.Module) -> None:
    """Checkpoints 1 and 2 committed, 3 without its marker (a crash before commit), a temporary."""
    for step in (1, 2, 3):
        d = save_pretrained(micro, run / "checkpoints" / f"step-{step:08d}")
        if step < 3:
            (d / MARKER).write_text(f"{step}\n")
    (run / "checkpoints" / "step-00000004.tmp-999").mkdir()


def test_run_directory_resolves_to_its_newest_committed_checkpoint(
    micro: torch.nn.Module, tmp_path: Path
) -> None:
    _fake_run(tmp_path / "run", micro)
    ckpts = tmp_path / "run" / "checkpoints"
    assert committed_checkpoints(tmp_path / "run") == [ckpts / "step-00000001", ckpts / "step-00000002"]
    assert latest_checkpoint(tmp_path / "run") == ckpts / "step-00000002"
    r = resolve_model(str(tmp_path / "run"))
    assert (r.kind, r.weights) == ("run", ckpts / "step-00000002")
    assert "step-00000002" in r.description
    model, _ = load_model(r)
    assert _hf(model.config) == _hf(micro.config)


def test_run_directory_without_a_committed_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "step-00000001").mkdir(parents=True)  # never committed
    assert committed_checkpoints(tmp_path) == [] and latest_checkpoint(tmp_path) is None
    assert committed_checkpoints(tmp_path / "nothing") == []
    with pytest.raises(SpecError, match="is a run directory without a committed checkpoint yet"):
        resolve_model(tmp_path)


def test_load_refuses_what_does_not_fit_and_tiny_vocabularies() -> None:
    with pytest.raises(SpecError, match=r"micro has 0.0B parameters .* in fp32\); that does not fit"):
        load_model(resolve_model("micro"), max_memory_share=1e-12)
    small = ResolvedModel("small", "preset", get_preset("micro", vocab_size=100))
    with pytest.raises(TokenizerError, match="vocab_size=100 < 256"):
        load_tokenizer(small)
    model, tok = load_model(resolve_model("micro"), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16 and tok.is_bytes


@pytest.mark.parametrize("spec", ["./no/such/dir", "runs/typo", ".hidden-run", "missing.json", "cfg.toml"])
def test_a_missing_path_is_no_such_file_not_an_unknown_preset(spec: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match=f"^no such file or directory: {re.escape(spec)}$"):
        resolve_model(spec)


def test_a_path_that_exists_only_in_part_names_the_missing_part(tmp_path) -> None:
    (tmp_path / "runs").mkdir()
    spec = str(tmp_path / "runs" / "typo")
    pattern = f"^no such file or directory: {re.escape(spec)} \\(.*runs exists\\)$"
    with pytest.raises(SpecError, match=pattern):
        resolve_model(spec)


def test_a_bare_name_is_still_an_unknown_preset(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError, match="^unknown preset 'mikro'; presets: .*micro"):
        resolve_model("mikro")


def test_a_config_json_that_is_not_a_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").mkdir()
    with pytest.raises(SpecError, match=f"^{re.escape(str(tmp_path / 'config.json'))} is not a file$"):
        resolve_model(str(tmp_path))
