"""Parity with transformers 5.24, HF -> widemoe, through the real loader.

Build a tiny random model per family in transformers (fp32, CPU), save_pretrained, load with
widemoe.hf.load_pretrained, compare logits (atol 1e-5) and the chosen experts per token per layer
exactly. Sequences run past YaRN's original_max_position_embeddings where the family uses YaRN.
The reverse direction is in test_hf_export.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from widemoe.hf import load_pretrained  # noqa: E402

YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
MLA = dict(q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4)
SEQ = 40  # > original_max_position_embeddings = 16


def _deepseek_v3(**kw):
    return transformers.DeepseekV3Config(
        **{
            **COMMON,
            **MLA,
            **dict(
                intermediate_size=96,
                moe_intermediate_size=32,
                n_routed_experts=8,
                n_shared_experts=1,
                num_experts_per_tok=2,
                n_group=4,
                topk_group=2,
                first_k_dense_replace=1,
                routed_scaling_factor=2.5,
                max_position_embeddings=64,
                rope_scaling=YARN,
                num_nextn_predict_layers=1,
            ),
            **kw,
        }
    )


CONFIGS = {
    "deepseek_v3": lambda: _deepseek_v3(),
    "kimi_k2": lambda: _deepseek_v3(
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.827,
        num_nextn_predict_layers=0,
        rope_scaling={**YARN, "beta_fast": 1, "beta_slow": 1},
        rope_theta=50000.0,
    ),
    "deepseek_v2_lite": lambda: transformers.DeepseekV2Config(
        **{
            **COMMON,
            **MLA,
            **dict(
                q_lora_rank=None,
                intermediate_size=96,
                moe_intermediate_size=32,
                n_routed_experts=8,
                n_shared_experts=2,
                num_experts_per_tok=2,
                first_k_dense_replace=1,
                topk_method="greedy",
                norm_topk_prob=False,
                max_position_embeddings=64,
                rope_scaling={**YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
            ),
        }
    ),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=80,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        mlp_only_layers=[1],
    ),
    # v5 rope_parameters; no mscale keys, so transformers scales cos/sin by 0.1 ln 4 + 1 (GQA YaRN)
    "qwen3_moe_yarn": lambda: transformers.Qwen3MoeConfig(
        **COMMON,
        num_key_value_heads=2,
        head_dim=16,
        moe_intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1e6,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mixtral": lambda: transformers.MixtralConfig(
        **COMMON, num_key_value_heads=2, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2
    ),
    "olmoe": lambda: transformers.OlmoeConfig(
        **COMMON,
        num_key_value_heads=4,
        intermediate_size=32,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        eos_token_id=0,
        pad_token_id=1,
    ),
}


def _randomise_bias(model: torch.nn.Module, seed: int) -> None:
    """A non-zero e_score_correction_bias large enough to change which experts are chosen."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)


def _hf_routing(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    chosen: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: chosen.append(out[2].sort(-1).values))
        for name, m in model.named_modules()
        if name.endswith("mlp.gate")
    ]
    with torch.no_grad():
        logits = model(ids).logits
    for h in hooks:
        h.remove()
    return logits, chosen


def _ours(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad():
        out = model(ids)
    return out.logits, [r.topk_ids.sort(-1).values for r in out.routing]


def _add_mtp_layer(d: str, num_layers: int) -> dict[str, torch.Tensor]:
    """DeepSeek stores MTP module 0 at model.layers.{L}; transformers drops it, so write one here."""
    sd = load_file(f"{d}/model.safetensors")
    g = torch.Generator().manual_seed(7)
    extra = {}
    for k, v in sd.items():
        if k.startswith("model.layers.1."):  # an MoE decoder block as the MTP block
            extra[k.replace("model.layers.1.", f"model.layers.{num_layers}.")] = torch.randn(
                v.shape, generator=g
            )
    D = sd["model.norm.weight"].shape[0]
    base = f"model.layers.{num_layers}"
    extra.update(
        {
            f"{base}.enorm.weight": torch.rand(D, generator=g),
            f"{base}.hnorm.weight": torch.rand(D, generator=g),
            f"{base}.eh_proj.weight": torch.randn(D, 2 * D, generator=g),
            f"{base}.shared_head.norm.weight": torch.rand(D, generator=g),
            f"{base}.embed_tokens.weight": sd["model.embed_tokens.weight"].clone(),
            f"{base}.shared_head.head.weight": sd["lm_head.weight"].clone(),
        }
    )
    save_file({**sd, **extra}, f"{d}/model.safetensors", metadata={"format": "pt"})
    return extra


@pytest.mark.parametrize("family", list(CONFIGS))
def test_hf_to_widemoe_logits_and_experts(family: str, tmp_path) -> None:
    torch.manual_seed(0)
    hf_cfg = CONFIGS[family]()
    ref = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    _randomise_bias(ref, 1)
    ref.save_pretrained(tmp_path)
    extra = {}
    if family == "deepseek_v3":
        extra = _add_mtp_layer(str(tmp_path), hf_cfg.num_hidden_layers)
    if family == "kimi_k2":  # as the real release: model_type kimi_k2, remote code declared
        conf = json.loads((tmp_path / "config.json").read_text())
        conf.update(
            model_type="kimi_k2", auto_map={"AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"}
        )
        (tmp_path / "config.json").write_text(json.dumps(conf))

    model = load_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, hf_cfg.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(3))
    ref_logits, ref_ids = _hf_routing(ref, ids)
    logits, ours_ids = _ours(model, ids)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    assert len(ours_ids) == len(ref_ids) > 0
    for a, b in zip(ours_ids, ref_ids):
        assert torch.equal(a, b)

    if family == "deepseek_v3":
        cfg = model.config
        assert cfg.num_nextn_predict_layers == 1 and len(model.model.mtp) == 1
        sd = model.state_dict()
        I = cfg.moe_intermediate_size
        assert torch.equal(sd["model.mtp.0.eh_proj.weight"], extra["model.layers.3.eh_proj.weight"])
        assert torch.equal(
            sd["model.mtp.0.shared_head_norm.weight"], extra["model.layers.3.shared_head.norm.weight"]
        )
        assert torch.equal(
            sd["model.mtp.0.block.mlp.experts.gate_up_proj"][5, I:],
            extra["model.layers.3.mlp.experts.5.up_proj.weight"],
        )
        assert len(model.load_report.verified_copies) == 2
        # the bias is large enough to matter: without it the choices differ
        sel = [r.topk_ids for r in model(ids).routing]
        for b in model.buffers():
            if b.shape == (8,) and b.dtype == torch.float32:
                b.zero_()
        assert any(not torch.equal(x, r.topk_ids) for x, r in zip(sel, model(ids).routing))
    if family == "kimi_k2":
        assert any("auto_map" in n for n in model.load_report.notices)
        assert model.config.model_type == "kimi_k2"
