"""Parity with transformers 5.24, widemoe -> HF: save_pretrained, then transformers'
AutoModelForCausalLM.from_pretrained gives the same logits (atol 1e-5) and the same experts per token,
and widemoe reads its own export back bit-exactly (MTP included). Sharded output with an index.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_parity import MLA, SEQ, YARN, _hf_routing, _ours, _randomise_bias  # noqa: E402
from widemoe.hf import load_pretrained, save_pretrained  # noqa: E402
from widemoe.model.causal_lm import build_model  # noqa: E402
from widemoe.presets import get_preset  # noqa: E402


@pytest.mark.parametrize(
    "preset,family",
    [
        ("micro", "deepseek_v3"),
        ("deepseek-v2-lite", "deepseek_v2"),
        ("qwen3-30b-a3b", "qwen3_moe"),
        ("mixtral-8x7b", "mixtral"),
        ("olmoe-1b-7b", "olmoe"),
    ],
)
def test_widemoe_to_hf_logits(preset: str, family: str, tmp_path) -> None:
    small = dict(
        vocab_size=96,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=None,
    )
    if family in ("deepseek_v3", "deepseek_v2"):
        small.update(MLA, q_lora_rank=None if family == "deepseek_v2" else 32)
        small["rope_scaling"] = {
            **YARN,
            **({"mscale": 0.707, "mscale_all_dim": 0.707} if family == "deepseek_v2" else {}),
        }
    else:
        small.update(num_key_value_heads=2, head_dim=16)
        if family != "qwen3_moe":
            small["intermediate_size"] = 32
    cfg = get_preset(preset, **small)
    model = build_model(cfg, seed=0).eval()
    _randomise_bias(model, 2)
    save_pretrained(model, tmp_path, max_shard_size="60KB")  # several shards + index
    assert (tmp_path / "model.safetensors.index.json").exists()
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["model_type"] == family and "quantization_config" not in conf
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(4))
    ref_logits, ref_ids = _hf_routing(hf, ids)
    logits, ours_ids = _ours(model, ids)
    torch.testing.assert_close(ref_logits, logits, atol=1e-5, rtol=0)
    for a, b in zip(ours_ids, ref_ids):
        assert torch.equal(a, b)
    # and back: widemoe reads its own export bit-exactly, MTP included
    again = load_pretrained(tmp_path, dtype=torch.float32)
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(again.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
