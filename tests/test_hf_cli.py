"""`widemoe convert` (FP8 -> bf16) and `widemoe inspect` on tiny checkpoint directories."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from widemoe.cli import main
from widemoe.hf import LoadError, convert_checkpoint, load_pretrained, save_pretrained
from widemoe.hf.fp8 import dequantize, quantize
from widemoe.hf.safetensors_io import read_safetensors_header
from widemoe.model.causal_lm import build_model
from widemoe.presets import get_preset


def _fp8_dir(tmp_path):
    """A micro DeepSeek model written as an FP8 directory (block 16, partial edge blocks) + a tokenizer."""
    cfg = get_preset("micro", vocab_size=64)
    model = build_model(cfg, seed=1)
    src = tmp_path / "src"
    save_pretrained(model, src)
    sd = load_file(src / "model.safetensors")
    for k in list(sd):
        if sd[k].dim() == 2 and not any(
            s in k for s in ("embed", "lm_head", "mlp.gate.", "eh_proj", "shared_head")
        ):
            sd[k], sd[k + "_scale_inv"] = quantize(sd[k], (16, 16))
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    conf = json.loads((src / "config.json").read_text())
    conf["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [16, 16],
    }
    (src / "config.json").write_text(json.dumps(conf))
    (src / "tokenizer.json").write_text(
        '{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}'
    )
    (src / "modeling_evil.py").write_text("raise SystemExit('executed')\n")
    return src, sd


def test_convert_fp8_to_bf16(tmp_path, capsys) -> None:
    src, sd = _fp8_dir(tmp_path)
    dst = tmp_path / "dst"
    assert main(["convert", str(src), str(dst), "--dtype", "bf16"]) == 0
    msg = capsys.readouterr().out
    assert "FP8-dequantised" in msg and "2 MTP copies verified" in msg and "0 ignored" in msg
    conf = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in conf and conf["dtype"] == "bfloat16"
    assert (dst / "tokenizer.json").exists() and not (dst / "modeling_evil.py").exists()
    assert (
        json.loads((dst / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )
    header = read_safetensors_header(dst / "model.safetensors")
    assert not any(k.endswith("_scale_inv") for k in header)
    assert header["model.layers.1.mlp.experts.2.down_proj.weight"].dtype == torch.bfloat16
    assert header["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    k = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"  # 40 rows: a partial block of 8
    want = dequantize(sd[k], sd[k + "_scale_inv"], (16, 16), out_dtype=torch.bfloat16)
    assert torch.equal(load_file(dst / "model.safetensors")[k], want)
    m = load_pretrained(dst)
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    # the streaming converter writes exactly what load_pretrained + save_pretrained would
    save_pretrained(load_pretrained(src, dtype="bf16"), tmp_path / "ref")
    got, ref = load_file(dst / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_inspect_reports_family_quantisation_and_accounting(tmp_path, capsys) -> None:
    src, _ = _fp8_dir(tmp_path)
    assert main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    for needle in (
        "deepseek_v3",
        "fp8 e4m3, block [16, 16]",
        "MTP",
        "MoE 8x32 top-2 + 1 shared",
        "accounting    OK",
        "active/token",
    ):
        assert needle in out, needle


def test_inspect_fails_on_a_directory_that_would_not_load(tmp_path, capsys) -> None:
    src, sd = _fp8_dir(tmp_path)
    del sd["model.layers.2.mlp.experts.5.gate_proj.weight"]
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    assert main(["inspect", str(src)]) == 1
    assert "model.layers.2.mlp.experts.5.gate_proj.weight" in capsys.readouterr().out


def _micro_dir(tmp_path, edit):
    """A micro checkpoint saved by widemoe, then edited (``edit(state_dict)``)."""
    src = tmp_path / "src"
    save_pretrained(build_model(get_preset("micro", vocab_size=64), seed=1), src)
    sd = load_file(src / "model.safetensors")
    edit(sd)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    return src


_L = get_preset("micro").num_hidden_layers
_BROKEN = {  # how the directory is broken -> the key every reader must name
    "extra": (lambda sd: sd.update({"model.extra.weight": torch.zeros(4)}), "model.extra.weight"),
    "missing": (lambda sd: sd.pop("model.norm.weight"), "model.norm.weight"),
    "shape": (
        lambda sd: sd.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 60)}),
        "model.layers.0.self_attn.o_proj.weight",
    ),
    "copy differs": (
        lambda sd: sd[f"model.layers.{_L}.embed_tokens.weight"].add_(1.0),
        f"model.layers.{_L}.embed_tokens.weight",
    ),
    "integer data": (
        lambda sd: sd.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}),
        "model.norm.weight",
    ),
}


@pytest.mark.parametrize("how", list(_BROKEN))
def test_inspect_load_and_convert_agree(tmp_path, capsys, how) -> None:
    """inspect says "accounting OK" exactly when the loader loads: all three run one accounting."""
    edit, key = _BROKEN[how]
    src = _micro_dir(tmp_path, edit)
    assert main(["inspect", str(src)]) == 1
    out, err = capsys.readouterr()
    assert "accounting    FAILS" in out and key in out
    errors = [line for line in err.splitlines() if "error:" in line]  # one line: the loader's refusal
    assert len(errors) == 1 and key in errors[0] and str(src) in errors[0]
    with pytest.raises(LoadError) as loaded:
        load_pretrained(src)
    with pytest.raises(LoadError) as converted:
        convert_checkpoint(src, tmp_path / "dst")
    assert str(loaded.value) == str(converted.value) and key in str(loaded.value)
    assert str(loaded.value) in out  # inspect prints the loader's own message
    assert not (tmp_path / "dst").exists()


def test_inspect_names_a_truncated_file(tmp_path, capsys) -> None:
    src = _micro_dir(tmp_path, lambda sd: None)
    with open(src / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(src)])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert f"{src / 'model.safetensors'}: truncated: header says" in err and "Traceback" not in err


def test_inspect_a_run_directory_reads_its_newest_checkpoint(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    for step in (2, 4):
        ck = run / "checkpoints" / f"step-{step:08d}"
        save_pretrained(build_model(get_preset("micro", vocab_size=64), seed=1), ck)
        (ck / "COMMITTED").write_text("")
    (run / "checkpoints" / "step-00000006").mkdir()  # not committed: ignored
    assert main(["inspect", str(run)]) == 0
    out = capsys.readouterr().out
    assert "newest committed checkpoint, step-00000004" in out and "accounting    OK" in out


def test_convert_a_run_directory_converts_its_newest_checkpoint(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    for step, seed in ((2, 1), (4, 2)):
        ck = run / "checkpoints" / f"step-{step:08d}"
        save_pretrained(build_model(get_preset("micro", vocab_size=64), seed=seed), ck)
        (ck / "COMMITTED").write_text("")
    (run / "checkpoints" / "step-00000006").mkdir()  # not committed: ignored
    assert main(["convert", str(run), str(tmp_path / "out"), "--dtype", "fp32"]) == 0
    assert "converting its newest committed checkpoint, step-00000004" in capsys.readouterr().out
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = load_file(run / "checkpoints" / "step-00000004" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_convert_says_what_ignore_skipped_zero_filled_and_excused_nothing(tmp_path, capsys) -> None:
    cfg = get_preset("micro", vocab_size=64)
    src = tmp_path / "src"
    save_pretrained(build_model(cfg, seed=1), src)
    sd = load_file(src / "model.safetensors")
    sd["model.mystery.weight"] = torch.zeros(3)  # a tensor the model has no place for
    lost = "model.layers.0.self_attn.o_proj.weight"
    del sd[lost]  # a tensor the model needs
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    argv = ["convert", str(src), str(tmp_path / "out"), "--dtype", "fp32",
            "--ignore", "mystery", "--ignore", "o_proj", "--ignore", "input_layernorm"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "skipped 1 checkpoint tensor(s), neither loaded nor checked: model.mystery.weight" in out
    assert "left 1 model tensor(s) ZERO, the checkpoint lacks them: model.layers.0.self_attn.o_proj" in out
    assert "--ignore 'input_layernorm' excused nothing" in out
    assert "1 ignored, 1 zero-filled" in out
    written = load_file(tmp_path / "out" / "model.safetensors")
    assert not written[lost].any() and "model.mystery.weight" not in written
