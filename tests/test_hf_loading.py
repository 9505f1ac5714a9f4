"""Strict accounting, FP8 dequantisation, layouts and safety of widemoe.hf loading (no transformers)."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from widemoe.hf import (
    DamagedCheckpointError,
    LoadError,
    PickleCheckpointError,
    load_into,
    load_pretrained,
    save_pretrained,
)
from widemoe.hf.fp8 import dequantize, parse_quantization_config, quantize
from widemoe.hf.safetensors_io import read_safetensors_header
from widemoe.model.causal_lm import build_model
from widemoe.presets import get_preset

ST = "model.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A micro DeepSeek-V3-style model (groups, bias, shared expert, MTP) saved by widemoe."""
    cfg = get_preset("micro", vocab_size=64, q_lora_rank=None)
    model = build_model(cfg, seed=0).eval()
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)
    d = tmp_path_factory.mktemp("micro")
    save_pretrained(model, d)
    return model, d


def _copy(src, dst, edit) -> None:
    sd = load_file(f"{src}/{ST}")
    edit(sd)
    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(sd, f"{dst}/{ST}", metadata={"format": "pt"})


def _same_weights(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_round_trip_on_disk_names(saved) -> None:
    model, d = saved
    keys = set(read_safetensors_header(d / ST))
    L = model.config.num_hidden_layers
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in keys
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in keys
    assert {
        f"model.layers.{L}.eh_proj.weight",
        f"model.layers.{L}.embed_tokens.weight",
        f"model.layers.{L}.shared_head.head.weight",
        f"model.layers.{L}.shared_head.norm.weight",
    } <= keys
    assert not any("gate_up_proj" in k for k in keys)
    again = load_pretrained(d, dtype=torch.float32)
    _same_weights(model, again)
    assert again.state_dict()["model.layers.1.mlp.gate.e_score_correction_bias"].abs().sum() > 0


def test_missing_expert_tensor_is_named(saved, tmp_path) -> None:
    _, d = saved
    _copy(d, tmp_path / "x", lambda sd: sd.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    with pytest.raises(LoadError, match=r"model\.layers\.2\.mlp\.experts\.3\.up_proj\.weight") as e:
        load_pretrained(tmp_path / "x")
    assert len(e.value.missing) == 1


def test_extra_tensor_is_named_and_ignore_is_explicit(saved, tmp_path) -> None:
    model, d = saved
    _copy(
        d,
        tmp_path / "x",
        lambda sd: sd.update({"model.layers.1.mlp.experts.8.up_proj.weight": torch.zeros(32, 64)}),
    )
    with pytest.raises(
        LoadError, match=r"unexpected keys:\n  model\.layers\.1\.mlp\.experts\.8\.up_proj"
    ) as e:
        load_pretrained(tmp_path / "x")
    assert e.value.unexpected and not e.value.missing
    m = load_pretrained(tmp_path / "x", dtype=torch.float32, ignore=[r"experts\.8\."])
    assert m.load_report.ignored == ["model.layers.1.mlp.experts.8.up_proj.weight"]
    _same_weights(model, m)


def test_wrong_shape_names_expected_and_found(saved, tmp_path) -> None:
    _, d = saved
    _copy(
        d,
        tmp_path / "x",
        lambda sd: sd.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 60)}),
    )
    with pytest.raises(LoadError, match=r"o_proj\.weight: expected \[64, 64\] vs found \[64, 60\]"):
        load_pretrained(tmp_path / "x")


def test_fused_v5_expert_layout_loads(saved, tmp_path) -> None:
    model, d = saved

    def fuse(sd):
        for i in (1, 2):
            p = f"model.layers.{i}.mlp.experts"
            gu = [
                torch.cat([sd.pop(f"{p}.{e}.gate_proj.weight"), sd.pop(f"{p}.{e}.up_proj.weight")])
                for e in range(8)
            ]
            sd[f"{p}.gate_up_proj"] = torch.stack(gu)
            sd[f"{p}.down_proj"] = torch.stack([sd.pop(f"{p}.{e}.down_proj.weight") for e in range(8)])

    _copy(d, tmp_path / "x", fuse)
    _same_weights(model, load_pretrained(tmp_path / "x", dtype=torch.float32))


def test_fused_and_per_expert_together_is_an_error(saved, tmp_path) -> None:
    _, d = saved
    _copy(
        d,
        tmp_path / "x",
        lambda sd: sd.update({"model.layers.1.mlp.experts.down_proj": torch.zeros(8, 64, 32)}),
    )
    with pytest.raises(LoadError, match="already written by"):
        load_pretrained(tmp_path / "x")


def test_mtp_copies_are_verified(saved, tmp_path) -> None:
    _, d = saved
    _copy(d, tmp_path / "x", lambda sd: sd[f"model.layers.{3}.embed_tokens.weight"].add_(1.0))
    with pytest.raises(
        LoadError, match=r"model\.layers\.3\.embed_tokens\.weight: differs from model\.embed_tokens"
    ):
        load_pretrained(tmp_path / "x")


def test_sharded_directory_loads_and_index_is_checked(saved, tmp_path) -> None:
    model, _ = saved
    out = tmp_path / "sharded"
    save_pretrained(model, out, max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    _same_weights(model, load_pretrained(out, dtype=torch.float32))
    index["weight_map"]["model.norm.weight"] = "../evil.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="plain .safetensors file name"):
        load_pretrained(out)


class _Boom:
    def __reduce__(self):
        return (open, ("/tmp/widemoe_pickle_was_executed", "w"))


def test_pickle_checkpoint_is_refused_and_never_unpickled(saved, tmp_path) -> None:
    _, d = saved
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom()))
    marker = __import__("pathlib").Path("/tmp/widemoe_pickle_was_executed")
    marker.unlink(missing_ok=True)
    with pytest.raises(PickleCheckpointError, match=r"pytorch_model\.bin.*save_pretrained"):
        load_pretrained(tmp_path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ FP8


def _oracle_dequant(w_q: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    out = torch.empty(w_q.shape)
    for i in range(w_q.shape[0]):
        for j in range(0, w_q.shape[1], block[1]):
            out[i, j : j + block[1]] = w_q[i, j : j + block[1]].float() * s[i // block[0], j // block[1]]
    return out


@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_partial_edge_blocks(ue8m0: bool) -> None:
    w = torch.randn(576, 200) * 0.05  # 576 rows -> 5-row scale grid; 200 cols -> 2 (partial) columns
    w_q, s = quantize(w, (128, 128), ue8m0=ue8m0)
    assert w_q.dtype == torch.float8_e4m3fn and s.shape == (5, 2) and s.dtype == torch.float32
    if ue8m0:
        assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    deq = dequantize(w_q, s, (128, 128), out_dtype=torch.float32)
    torch.testing.assert_close(deq, _oracle_dequant(w_q, s, (128, 128)), rtol=0, atol=0)
    assert (deq - w).norm() / w.norm() < 0.05  # e4m3 has 3 mantissa bits: a few percent of error at most
    with pytest.raises(ValueError, match=r"expected \[5, 2\]"):
        dequantize(w_q, s[:4], (128, 128))


def test_quantization_config_parsing() -> None:
    spec = parse_quantization_config(
        {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}
    )
    assert spec.block == (128, 128) and spec.ue8m0
    with pytest.raises(ValueError, match="quant_method='gptq'"):
        parse_quantization_config({"quant_method": "gptq"})


def _is_fp8_target(k: str, t: torch.Tensor) -> bool:
    """DeepSeek's rule: every Linear is FP8 except embed, head, router gate and MTP eh_proj/head copies."""
    return t.dim() == 2 and not any(
        s in k for s in ("embed_tokens", "lm_head", "mlp.gate.", "eh_proj", "shared_head")
    )


@pytest.mark.parametrize("ue8m0", [False, True])
def test_fp8_checkpoint_loads_as_dequantised_reference(saved, tmp_path, ue8m0: bool) -> None:
    _, d = saved
    block = (16, 16)  # kv_a_proj_with_mqa has 32+8 = 40 rows: a partial edge block
    ref = {}

    def to_fp8(sd):
        for k in list(sd):
            if _is_fp8_target(k, sd[k]):
                w_q, s = quantize(sd[k], block, ue8m0=ue8m0)
                sd[k] = w_q
                sd[k + "_scale_inv"] = s
                ref[k] = _oracle_dequant(w_q, s, block)

    _copy(d, tmp_path / "fp8", to_fp8)
    conf = json.loads((tmp_path / "fp8" / "config.json").read_text())
    conf["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        **({"scale_fmt": "ue8m0"} if ue8m0 else {}),
    }
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(conf))
    assert any(math.remainder(v.shape[0], 16) for v in ref.values())  # partial blocks exercised

    m = load_pretrained(tmp_path / "fp8", dtype=torch.float32)
    rep = m.load_report
    assert rep.dequantized == len(ref) == rep.scales > 0
    sd = m.state_dict()
    torch.testing.assert_close(
        sd["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"],
        ref["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"],
        rtol=0,
        atol=0,
    )
    I = m.config.moe_intermediate_size
    torch.testing.assert_close(
        sd["model.layers.1.mlp.experts.gate_up_proj"][3, I:],
        ref["model.layers.1.mlp.experts.3.up_proj.weight"],
        rtol=0,
        atol=0,
    )
    # exported again: plain weights, no stale quantization_config
    save_pretrained(m, tmp_path / "out")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_fp8_weight_without_scale_is_missing(saved, tmp_path) -> None:
    _, d = saved
    k = "model.layers.0.self_attn.o_proj.weight"
    _copy(d, tmp_path / "x", lambda sd: sd.update({k: sd[k].to(torch.float8_e4m3fn)}))
    conf = json.loads((tmp_path / "x" / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (tmp_path / "x" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(LoadError, match=r"o_proj\.weight_scale_inv \(scale of the FP8 weight"):
        load_pretrained(tmp_path / "x")


def test_save_writes_tokenizer_files(saved, tmp_path) -> None:
    from tokenizers import Tokenizer, models

    model, _ = saved
    vocab = {f"t{i}": i for i in range(64)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t1"))
    save_pretrained(model, tmp_path, tokenizer=tok)
    assert Tokenizer.from_file(str(tmp_path / "tokenizer.json")).token_to_id("t5") == 5
    conf = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert conf["eos_token"] == "t0" and conf["tokenizer_class"] == "PreTrainedTokenizerFast"


# ------------------------------------------------------------------------------------------------ damaged


def _damaged(saved, tmp_path, damage, **save_kw):
    """A copy of the saved model, damaged by ``damage(dir)``; returns the directory."""
    model, _ = saved
    out = tmp_path / "damaged"
    save_pretrained(model, out, **save_kw)
    damage(out)
    return out


def _truncate(path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def test_deleted_shard_is_named(saved, tmp_path) -> None:
    out = _damaged(saved, tmp_path, lambda d: None, max_shard_size="60KB")
    shards = sorted(
        set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    )
    assert len(shards) > 2
    (out / shards[1]).unlink()
    with pytest.raises(DamagedCheckpointError, match=rf"{shards[1]}: missing \(listed in .* for \d+ tensors"):
        load_pretrained(out)


def test_truncated_data_names_file_and_sizes(saved, tmp_path) -> None:
    size = {}

    def cut(d):
        size["full"] = (d / ST).stat().st_size
        _truncate(d / ST, size["full"] - 1000)

    out = _damaged(saved, tmp_path, cut)
    base = 8 + int.from_bytes((out / ST).read_bytes()[:8], "little")
    data = size["full"] - base
    want = rf"{ST}: truncated: header says {data} bytes of tensor data, file has {data - 1000}$"
    with pytest.raises(DamagedCheckpointError, match=want):
        load_pretrained(out)


@pytest.mark.parametrize(("size", "what"), [(0, "shorter than"), (5, "shorter than"), (40, "JSON header is")])
def test_truncated_header_is_named(saved, tmp_path, size, what) -> None:
    out = _damaged(saved, tmp_path, lambda d: _truncate(d / ST, size))
    with pytest.raises(DamagedCheckpointError, match=rf"{ST}: truncated: .*{what}"):
        load_pretrained(out)


def test_malformed_header_entry_is_named_not_a_traceback(saved, tmp_path) -> None:
    def edit(d):
        raw = (d / ST).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        del header["model.norm.weight"]["shape"]
        new = json.dumps(header, separators=(",", ":")).encode()
        new += b" " * (n - len(new))  # same length: the data offsets stay right
        (d / ST).write_bytes(raw[:8] + new + raw[8 + n :])

    out = _damaged(saved, tmp_path, edit)
    with pytest.raises(DamagedCheckpointError, match=r"tensor 'model\.norm\.weight' has a malformed header"):
        load_pretrained(out)


def test_file_cut_while_loading_is_named(saved, tmp_path) -> None:
    from widemoe.hf.loader import allocate_empty, params_on_meta
    from widemoe.hf.source import open_checkpoint
    from widemoe.model.causal_lm import WideMoeForCausalLM

    out = _damaged(saved, tmp_path, lambda d: None)
    src = open_checkpoint(out)  # headers read while the file was whole
    _truncate(out / ST, (out / ST).stat().st_size // 2)
    with params_on_meta():
        model = allocate_empty(WideMoeForCausalLM(src.cfg))
    with pytest.raises(DamagedCheckpointError, match=rf"{ST}: truncated: ends at byte \d+ while reading"):
        load_into(model, out, source=src)


def test_checkpoint_without_its_weights_is_not_called_a_pickle_checkpoint(saved, tmp_path) -> None:
    def strip(d):
        (d / ST).unlink()
        (d / "trainer_state.pt").write_bytes(b"not read")
        (d / "COMMITTED").write_text("")

    out = _damaged(saved, tmp_path, strip)
    with pytest.raises(
        DamagedCheckpointError, match=rf"{ST}: missing \(the checkpoint has COMMITTED, trainer_state\.pt"
    ):
        load_pretrained(out)


def test_a_damaged_weight_file_is_a_load_error(saved, tmp_path) -> None:
    """One type to catch for every refusal to load (a resume falls back on it)."""
    out = _damaged(saved, tmp_path, lambda d: _truncate(d / ST, 100))
    with pytest.raises(LoadError):
        load_pretrained(out)


def test_integer_data_for_a_float_parameter_is_a_mismatch(saved, tmp_path) -> None:
    _, d = saved
    _copy(d, tmp_path / "x", lambda sd: sd.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    with pytest.raises(
        LoadError, match=r"model\.norm\.weight: expected a floating-point tensor vs found int32"
    ):
        load_pretrained(tmp_path / "x")
