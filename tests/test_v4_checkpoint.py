"""DeepSeek-V4 checkpoints: transformers-saved and native directories, saving both layouts, FP8/FP4."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import DeepseekV4ForCausalLM

from test_v4_parity import hf_pair, make_ids, tiny_v4_config
from widemoe.hf import LoadError, hf_tensors, load_pretrained, model_config_to_hf, save_pretrained
from widemoe.hf import fp8 as fp8mod
from widemoe.hf.fp4 import dequantize_fp4, quantize_fp4

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


@pytest.fixture(scope="module")
def pair():  # noqa: ANN201
    return hf_pair(tiny_v4_config(index_topk=3))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        out = model(input_ids=ids) if isinstance(model, DeepseekV4ForCausalLM) else model(ids)
    return out.logits


def test_transformers_saved_directory_loads(pair, tmp_path) -> None:  # noqa: ANN001
    hf, wm = pair
    hf.save_pretrained(tmp_path / "hf")
    keys = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert keys["model_type"] == "deepseek_v4"
    m = load_pretrained(tmp_path / "hf", dtype="fp32")
    ids = make_ids(wm.config, 1, 41)
    assert (_logits(m, ids) - _logits(hf, ids)).abs().max().item() < 1e-5


@pytest.mark.parametrize("layout", ["native", "transformers"])
def test_saved_layouts_load_in_transformers_and_back(pair, tmp_path, layout: str) -> None:  # noqa: ANN001
    hf, wm = pair
    save_pretrained(wm, tmp_path / layout, layout=layout)
    ref, info = DeepseekV4ForCausalLM.from_pretrained(tmp_path / layout, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = make_ids(wm.config, 1, 41)
    assert (_logits(ref, ids) - _logits(hf, ids)).abs().max().item() < 1e-6
    back = load_pretrained(tmp_path / layout, dtype="fp32")
    assert (_logits(back, ids) - _logits(wm, ids)).abs().max().item() < 1e-6


def test_native_names_are_the_release_names(pair) -> None:  # noqa: ANN001
    _, wm = pair
    keys = {k for k, _ in hf_tensors(wm, "native")}
    for k in ("embed.weight", "head.weight", "norm.weight", "hc_head_fn", "layers.0.hc_attn_fn",
              "layers.0.attn.wq_a.weight", "layers.1.attn.compressor.ape",
              "layers.1.attn.indexer.wq_b.weight", "layers.1.attn.indexer.compressor.wkv.weight",
              "layers.0.ffn.gate.tid2eid", "layers.3.ffn.gate.bias", "layers.2.ffn.experts.7.w1.weight",
              "layers.2.ffn.shared_experts.w3.weight", "layers.0.attn.attn_sink"):
        assert k in keys, k
    assert not any(k.startswith("model.") for k in keys)


def test_strict_accounting_names_the_keys(pair, tmp_path) -> None:  # noqa: ANN001
    _, wm = pair
    d = tmp_path / "bad"
    save_pretrained(wm, d, layout="native")
    from safetensors.torch import load_file

    sd = load_file(d / "model.safetensors")
    del sd["layers.2.ffn.experts.3.w3.weight"]
    sd["layers.0.attn.bogus.weight"] = torch.zeros(2)
    save_file(sd, d / "model.safetensors")
    with pytest.raises(LoadError) as e:
        load_pretrained(d, dtype="fp32")
    assert "layers.2.ffn.experts.3.w3.weight" in str(e.value) and "layers.0.attn.bogus.weight" in str(e.value)


def _fp4_reference(packed: torch.Tensor, scale_e8m0: torch.Tensor) -> torch.Tensor:
    """Element by element: low nibble first, sign bit 3, value * 2^(scale byte - 127) per 32 values."""
    b = packed.view(torch.uint8).tolist()
    s = scale_e8m0.view(torch.uint8).tolist()
    rows = []
    for r, srow in zip(b, s, strict=True):
        vals = []
        for byte in r:
            for code in (byte & 15, byte >> 4):
                v = E2M1[code & 7]
                vals.append(-v if code & 8 else v)
        rows.append([v * 2.0 ** (srow[j // 32] - 127) for j, v in enumerate(vals)])
    return torch.tensor(rows)


def test_fp4_dequant_matches_reference_with_partial_block() -> None:
    torch.manual_seed(0)
    w = torch.randn(5, 48)  # 48 = one full block of 32 + a partial block of 16
    packed, scale = quantize_fp4(w)
    assert packed.dtype == torch.int8 and packed.shape == (5, 24) and scale.shape == (5, 2)
    deq = dequantize_fp4(packed, scale)
    assert torch.equal(deq, _fp4_reference(packed, scale))
    assert (deq - w).abs().max().item() <= 0.25 * w.abs().max().item()  # FP4 rounding only


def test_fp8_ue8m0_dequant_with_partial_blocks() -> None:
    torch.manual_seed(0)
    w = torch.randn(200, 130)  # 2 x 2 blocks of 128, the last ones partial
    q, s = fp8mod.quantize(w, (128, 128), ue8m0=True)
    e8 = (torch.log2(s).round() + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
    deq = fp8mod.dequantize(q, e8, (128, 128), out_dtype=torch.float32)
    ref = q.float() * s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :130]
    assert torch.equal(deq, ref)


def test_quantized_native_checkpoint_loads(pair, tmp_path) -> None:  # noqa: ANN001
    _, wm = pair
    d = tmp_path / "fp8"
    save_pretrained(wm, d, layout="native")
    from safetensors.torch import load_file

    sd, expect = load_file(d / "model.safetensors"), {}
    for k in list(sd):
        t = sd[k]
        if ".experts." in k:  # FP4 routed experts, 1x32 ue8m0 scales
            sd[k], sd[k[:-len(".weight")] + ".scale"] = quantize_fp4(t)
            expect[k] = dequantize_fp4(sd[k], sd[k[:-len(".weight")] + ".scale"])
        elif (t.dim() == 2 and ".attn.w" in k) or ".shared_experts." in k:  # FP8, 128x128 ue8m0 scales
            q, s = fp8mod.quantize(t, (128, 128), ue8m0=True)
            sd[k] = q
            sd[k[:-len(".weight")] + ".scale"] = (torch.log2(s).round() + 127).to(torch.uint8).view(
                torch.float8_e8m0fnu)
            grid = s.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]]
            expect[k] = q.float() * grid
    save_file(sd, d / "model.safetensors")
    cfg = model_config_to_hf(wm.config, dtype="float32", layout="native")
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                  "scale_fmt": "ue8m0"}
    (d / "config.json").write_text(json.dumps(cfg))
    m = load_pretrained(d, dtype="fp32")
    assert m.load_report.dequantized == len(expect) and m.load_report.scales == len(expect)
    got = m.state_dict()
    layer2 = "model.layers.2."
    torch.testing.assert_close(got[layer2 + "mlp.experts.gate_up_proj"][5, :32],
                               expect["layers.2.ffn.experts.5.w1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(got[layer2 + "mlp.experts.down_proj"][1],
                               expect["layers.2.ffn.experts.1.w2.weight"], rtol=0, atol=0)
    torch.testing.assert_close(got[layer2 + "self_attn.q_b_proj.weight"], expect["layers.2.attn.wq_b.weight"],
                               rtol=0, atol=0)


def test_save_pretrained_dispatches_to_v4(pair, tmp_path) -> None:  # noqa: ANN001
    _, wm = pair
    save_pretrained(wm, tmp_path / "sp")
    hdr = json.loads((tmp_path / "sp" / "config.json").read_text())
    assert hdr["architectures"] == ["DeepseekV4ForCausalLM"] and "layer_types" in hdr


def test_mtp_block_round_trips_in_native_layout(tmp_path) -> None:
    c = tiny_v4_config(layer_types=["sliding_attention", "compressed_sparse_attention"], num_hash_layers=1,
                       num_nextn_predict_layers=1)
    from widemoe.model.causal_lm import build_model

    wm = build_model(c, seed=0)
    keys = {k for k, _ in hf_tensors(wm, "native")}
    for k in ("mtp.0.e_proj.weight", "mtp.0.h_proj.weight", "mtp.0.enorm.weight", "mtp.0.norm.weight",
              "mtp.0.hc_head_fn", "mtp.0.hc_attn_fn", "mtp.0.attn.wq_a.weight", "mtp.0.ffn.gate.bias",
              "mtp.0.ffn.experts.0.w1.weight", "mtp.0.attn_norm.weight"):
        assert k in keys, k
    save_pretrained(wm, tmp_path / "n", layout="native")
    assert json.loads((tmp_path / "n" / "config.json").read_text())["compress_ratios"] == [0, 4, 0]
    back = load_pretrained(tmp_path / "n", dtype="fp32")
    assert back.config.num_nextn_predict_layers == 1
    for k, v in wm.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_streaming_convert_writes_what_load_and_save_would(pair, tmp_path) -> None:  # noqa: ANN001
    _, wm = pair
    src = tmp_path / "native"
    save_pretrained(wm, src, layout="native")
    from safetensors.torch import load_file

    sd = load_file(src / "model.safetensors")
    for k in [k for k in sd if ".experts." in k]:  # FP4 routed experts
        sd[k], sd[k[:-len(".weight")] + ".scale"] = quantize_fp4(sd[k])
    save_file(sd, src / "model.safetensors")
    cfg = model_config_to_hf(wm.config, dtype="float32", layout="native")
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (src / "config.json").write_text(json.dumps(cfg))
    from widemoe.hf import convert_checkpoint

    info = convert_checkpoint(src, tmp_path / "out", "fp32")
    assert info.family == "deepseek_v4" and info.dequantized == info.scales > 0
    save_pretrained(load_pretrained(src, dtype="fp32"), tmp_path / "ref")
    got = load_file(tmp_path / "out" / "model.safetensors")
    ref = load_file(tmp_path / "ref" / "model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
