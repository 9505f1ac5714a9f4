"""Tests of the cost calculator (`widemoe.cost`) and the `widemoe cost` command.

The closed-form counts are checked against the model itself: parameter totals against the model
built on the meta device (every preset), the KV figure against `KVCache.nbytes()` after decoding,
and the FLOPs formula against `torch.utils.flop_counter.FlopCounterMode` on tiny configs.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from widemoe.commands import cost as cost_cmd
from widemoe.cost import (
    FAMILIES,
    PUBLISHED,
    CostError,
    check_published,
    count_params,
    flops_per_token,
    formulas_for,
    get_gpu,
    gpu_hours,
    implied_mfu,
    kv_bytes,
    kv_bytes_per_token,
    parse_amount,
    parse_context,
    serving_gpus,
    standard,
    training_bytes_per_gpu,
    v3_implied_mfu,
    weight_bytes,
)
from widemoe.model.causal_lm import WideMoeForCausalLM
from widemoe.presets import PRESET_NAMES, get_preset

# Small variants that reach code paths the presets do not: GQA with biases and tied embeddings,
# full-width qk-norm, explicit dense layers, a model without MoE layers (its MTP block is dense).
_SMALL_GQA = dict(kv_lora_rank=None, q_lora_rank=None, num_key_value_heads=2, head_dim=16, qk_norm="head")
VARIANTS = {
    "gqa-bias-tied": get_preset("micro", **_SMALL_GQA, attention_bias=True, tie_word_embeddings=True),
    "gqa-full-norm": get_preset(
        "micro",
        **{**_SMALL_GQA, "qk_norm": "full"},
        topk_method="greedy",
        scoring_func="softmax",
        n_shared_experts=0,
    ),
    "mlp-only": get_preset("micro", first_k_dense_replace=0, mlp_only_layers=(1,)),
    "all-dense": get_preset("micro", first_k_dense_replace=3),
    "mla-no-qlora": get_preset("micro", q_lora_rank=None),
}


def _meta_model(c):
    with torch.device("meta"):
        return WideMoeForCausalLM(c)


# --- parameter counts ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_total_equals_meta_model_numel(name: str) -> None:
    c = get_preset(name)
    m = _meta_model(c)
    p = count_params(c)
    assert p.total_with_mtp == sum(t.numel() for t in m.parameters())
    bias = sum(b.numel() for n, b in m.named_buffers() if n.endswith("e_score_correction_bias"))
    assert p.buffers == bias
    mtp = sum(t.numel() for n, t in m.named_parameters() if ".mtp." in f".{n}")
    assert p.mtp == mtp


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_total_equals_meta_model_numel(variant: str) -> None:
    c = VARIANTS[variant]
    assert count_params(c).total_with_mtp == sum(t.numel() for t in _meta_model(c).parameters())


def test_deepseek_v3_exact_counts() -> None:
    p = count_params(get_preset("deepseek-v3"))
    assert p.main_total == 671_026_404_352
    assert p.mtp == 11_610_067_968
    assert p.total["routed_experts"] == 58 * 256 * 3 * 7168 * 2048
    assert p.active["routed_experts"] == 58 * 8 * 3 * 7168 * 2048
    assert p.active_with_embedding - p.active_without_embedding == 129280 * 7168


# The status each published figure gets; "differs" rows carry a documented convention note.
EXPECTED_STATUS = {
    ("deepseek-v3", "total", "671B"): "within 1%",
    ("deepseek-v3", "total_on_disk", "685B"): "within 1%",
    ("deepseek-v3", "active_without_embedding", "37B"): "at published precision",
    ("deepseek-v3", "active_without_embedding", "36.7B"): "within 1%",
    ("deepseek-v3", "mtp", "11.5B"): "within 1%",
    ("deepseek-v3", "mtp_active_with_shared", "2.4B"): "differs (see note)",
    ("kimi-k2", "total", "1.04T"): "differs (see note)",
    ("kimi-k2", "active_without_embedding", "32B"): "within 1%",
    ("deepseek-v2-lite", "total", "15.7B"): "within 1%",
    ("deepseek-v2-lite", "active_without_embedding", "2.4B"): "at published precision",
    ("qwen3-30b-a3b", "total", "30.5B"): "within 1%",
    ("qwen3-30b-a3b", "active_with_embedding", "3.3B"): "at published precision",
    ("qwen3-235b-a22b", "total", "235B"): "within 1%",
    ("qwen3-235b-a22b", "active_with_embedding", "22B"): "within 1%",
    ("mixtral-8x7b", "total", "46.7B"): "within 1%",
    ("mixtral-8x7b", "active_with_embedding", "12.9B"): "within 1%",
    ("olmoe-1b-7b", "total", "6.9B"): "within 1%",
    ("olmoe-1b-7b", "active_with_embedding", "1.3B"): "at published precision",
}


@pytest.mark.parametrize("fig", PUBLISHED, ids=lambda f: f"{f.model}-{f.quantity}-{f.text}")
def test_published_figures(fig) -> None:
    r = check_published(fig)
    assert r["status"] == EXPECTED_STATUS[(fig.model, fig.quantity, fig.text)]
    if r["status"] == "within 1%":
        assert abs(r["deviation"]) <= 0.01
    elif r["status"] == "differs (see note)":
        assert fig.note and abs(r["deviation"]) < 0.06
    else:  # the computed value rounds or truncates to the published digits
        assert abs(r["deviation"]) < 0.025


def test_every_total_within_one_percent_except_kimi() -> None:
    totals = [check_published(f) for f in PUBLISHED if f.quantity == "total" and f.model != "kimi-k2"]
    assert len(totals) == 6 and all(abs(r["deviation"]) <= 0.01 for r in totals)


def test_v4_seed_matches_the_article() -> None:
    c = get_preset("v4-seed")
    p = count_params(c)
    assert 0.95e12 < p.main_total < 1.05e12
    assert 31e9 < p.active_without_embedding < 33e9
    assert c.num_experts_per_tok == 16 and c.n_shared_experts > 0 and c.is_mla


# --- FLOPs -------------------------------------------------------------------------------------------


def _gmm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(a_shape) * b_shape[-1]  # grouped GEMM: every row of a against its expert's matrix


def _cpu_flash_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    B, H, T, d = q_shape
    return 2 * B * H * T * k_shape[-2] * (d + v_shape[-1])  # dense T x S, as torch counts SDPA


def _cpu_flash_backward_flops(grad_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * _cpu_flash_flops(q_shape, k_shape, v_shape)  # dq, dk, dv, d(scores): as torch counts SDPA


# FlopCounterMode has no formula for these ops; each counts what the kernel computes.
_CUSTOM = {
    torch.ops.aten._grouped_mm: _gmm_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
}


def _counted_experts(m: WideMoeForCausalLM) -> WideMoeForCausalLM:
    """FlopCounterMode is thread-local: run the experts on the calling thread so their FLOPs are seen."""
    for block in m.moe_blocks():
        block.experts.impl = "gmm"
    return m


@pytest.mark.parametrize("name", ["micro", "gqa-full-norm", "gqa-bias-tied"])
def test_forward_flops_match_flop_counter(name: str) -> None:
    c = get_preset("micro") if name == "micro" else VARIANTS[name]
    torch.manual_seed(0)
    m = _counted_experts(WideMoeForCausalLM(c).eval())
    B, T = 2, 24
    x = torch.randint(0, c.vocab_size, (B, T))
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as fc:
        m(x)
    # the counter charges attention for the dense T x T product: compare with causal=False
    f = flops_per_token(c, T, causal=False)
    assert fc.get_total_flops() / (B * T) == pytest.approx(f.forward, rel=0.02)
    # and term by term: projections + experts + router + head exactly, attention exactly or with the
    # fused CPU kernel's zero-padding of V to d_qk (MLA), which model FLOPs do not count
    by_op = {str(k): v / (B * T) for k, v in fc.get_flop_counts()["Global"].items()}
    matmul = sum(v for k, v in by_op.items() if k in ("aten.mm", "aten.addmm", "aten._grouped_mm"))
    attention = sum(v for k, v in by_op.items() if "attention" in k)
    other = sum(by_op.values()) - matmul - attention  # e.g. the combine as a [K] x [K, D] bmm
    assert matmul == f.forward_matmul and other <= 0.01 * f.forward
    d_v = c.v_head_dim if c.is_mla else c.gqa_head_dim
    padded = f.forward_attention * 2 * c.qk_head_dim / (c.qk_head_dim + d_v)
    assert attention in (f.forward_attention, padded)


def test_training_flops_match_flop_counter_with_mtp() -> None:
    c = get_preset("micro")
    torch.manual_seed(0)
    m = _counted_experts(WideMoeForCausalLM(c).train())
    B, T = 2, 16
    x = torch.randint(0, c.vocab_size, (B, T))
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as fc:
        m(x, labels=x).loss.backward()
    f = flops_per_token(c, T, causal=False)
    assert f.train_mtp > 0
    assert fc.get_total_flops() / (B * T) == pytest.approx(f.train, rel=0.02)


def test_causal_attention_term_is_half_plus_one() -> None:
    c = get_preset("deepseek-v3")
    full, causal = flops_per_token(c, 4096, causal=False), flops_per_token(c, 4096)
    assert causal.forward_attention == pytest.approx(full.forward_attention * 4097 / 8192)
    assert causal.train_matmul == 6 * count_params(c).matmul_active


# --- KV cache -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,dtype", [("micro", torch.float32), ("micro", torch.bfloat16), ("gqa-full-norm", torch.float32)]
)
def test_kv_bytes_match_cache_after_decoding(name: str, dtype: torch.dtype) -> None:
    c = get_preset("micro") if name == "micro" else VARIANTS[name]
    torch.manual_seed(0)
    m = WideMoeForCausalLM(c).to(dtype).eval()
    B, P, N = 2, 5, 7
    cache = m.new_cache()
    ids = torch.randint(0, c.vocab_size, (B, P))
    with torch.no_grad():
        for _ in range(N):
            nxt = m(ids, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
            ids = nxt
        m(ids, cache=cache)  # the last generated token enters the cache too
    assert cache.seq_len == P + N
    kv_dtype = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    assert cache.nbytes() == kv_bytes(c, P + N, B, kv_dtype)


def test_kv_reference_sizes() -> None:
    assert kv_bytes(get_preset("deepseek-v3"), 1) == 70_272  # 61 x 576 x 2 B
    assert kv_bytes(get_preset("deepseek-v2-lite"), 1) == 31_104
    assert kv_bytes(get_preset("mixtral-8x7b"), 1) == 32 * 2 * 8 * 128 * 2


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_kv_per_token_at_context_is_one_tokens_bytes_for_linear_caches(name: str) -> None:
    c = get_preset(name)
    per_token = [kv_bytes_per_token(c, ctx, batch) for ctx in (1, 4096, 131072) for batch in (1, 3)]
    if formulas_for(c) is standard.FORMULAS:  # linear caches: the average is exactly one token's bytes
        assert per_token == [kv_bytes(c, 1)] * len(per_token)
    else:  # V4: a window plus compressed entries, so the average falls as the context grows
        assert per_token[0] > per_token[2] > per_token[4]
    assert kv_bytes_per_token(c, 0) == kv_bytes(c, 1)


def test_family_table_picks_the_formulas() -> None:
    assert formulas_for(get_preset("deepseek-v4-flash")) is FAMILIES["deepseek_v4"]
    assert FAMILIES["deepseek_v4"].kv_contrast_preset == "deepseek-v3"
    for name in ("deepseek-v3", "kimi-k2", "qwen3-30b-a3b", "mixtral-8x7b", "olmoe-1b-7b"):
        assert formulas_for(get_preset(name)) is standard.FORMULAS, name


# --- memory, training cost, serving --------------------------------------------------------------------


def test_weight_bytes() -> None:
    c = get_preset("deepseek-v3")
    p = count_params(c)
    assert weight_bytes(c, "fp32") == 4 * (p.main_total + p.buffers)
    assert weight_bytes(c, "fp4") < weight_bytes(c, "fp8") < weight_bytes(c, "bf16") < 2.01 * p.main_total
    assert 640e9 < weight_bytes(c, "fp8") < 700e9  # the FP8 release is ~0.69 TB with its MTP layer


def test_training_memory_layouts() -> None:
    c = get_preset("deepseek-v3")
    p = count_params(c)
    z3 = training_bytes_per_gpu(c, dp=2048, ep=64, zero=3)
    assert z3["total"] == pytest.approx(16 * (p.total_with_mtp + p.buffers) / 2048)
    z1 = training_bytes_per_gpu(c, dp=2048, ep=64, zero=1)
    experts = p.total["routed_experts"] + p.mtp_total["routed_experts"]
    assert z1["weights_and_grads"] == pytest.approx(
        6 * (p.total_with_mtp + p.buffers - experts + experts / 64)
    )
    with pytest.raises(CostError, match="ep=3 must divide dp=8"):
        training_bytes_per_gpu(c, dp=8, ep=3)


def test_gpu_hours_and_implied_mfu_are_inverse() -> None:
    c, g = get_preset("deepseek-v3"), get_gpu("h800")
    hours = gpu_hours(c, 14.8e12, 4096, g, 0.3)
    assert implied_mfu(c, 14.8e12, 4096, g, hours) == pytest.approx(0.3)
    mfu = v3_implied_mfu()
    assert 0.3 < mfu["total_bf16"] < 0.45 and mfu["total_fp8"] == pytest.approx(
        mfu["total_bf16"] / 2, rel=1e-3
    )


def test_serving_gpus_grow_with_context() -> None:
    c, g = get_preset("deepseek-v3"), get_gpu("H100")
    n1 = serving_gpus(c, g, 1024)
    assert n1 == math.ceil((weight_bytes(c, "bf16") + kv_bytes(c, 1024)) / (80e9 * 0.9)) == 19
    assert serving_gpus(c, g, 1 << 20, batch=64) > n1
    assert serving_gpus(c, get_gpu("B200"), 1024) < n1


# --- parsing and inputs -------------------------------------------------------------------------------


def test_parse_context_and_amounts() -> None:
    assert parse_context("128k") == 131072 and parse_context("1M") == 1 << 20 and parse_context(4096) == 4096
    assert parse_amount("14.8T") == pytest.approx(14.8e12) and parse_amount("2.788M") == pytest.approx(
        2.788e6
    )
    with pytest.raises(CostError, match="non-negative"):
        parse_context("-5")
    with pytest.raises(CostError, match="not a number"):
        parse_context("lots")
    with pytest.raises(CostError, match="whole number"):
        parse_context("1.5")


# --- the command ---------------------------------------------------------------------------------------


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="widemoe")
    cost_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["cost", *argv])
    rc = args.func(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_json(capsys) -> None:
    rc, out, _ = _run(["deepseek-v3", "--json", "--context", "128k", "--gpu-hours", "2.788M"], capsys)
    assert rc == 0
    d = json.loads(out)["models"]["deepseek-v3"]
    assert d["params"]["total"] == 671_026_404_352
    assert d["memory"]["kv_bytes_at_context"] == 70_272 * 131072
    assert 0.3 < d["training"]["implied_mfu"] < 0.45


def test_cli_table_and_compare(capsys) -> None:
    rc, out, _ = _run(["micro"], capsys)
    assert rc == 0 and "parameters by component" in out and "KV cache" in out
    rc, out, _ = _run(["--compare", "kimi-k2", "v4-seed", "--published"], capsys)
    assert rc == 0 and "dense-1.8T" in out and "published vs computed" in out and "imply MFU" in out


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["no-such-model"], "unknown preset 'no-such-model'"),
        (["micro", "--context", "-1"], "--context='-1' must be a non-negative number"),
        (["micro", "--gpu", "A100"], "unknown gpu 'A100'"),
        ([], "give a MODEL"),
    ],
)
def test_cli_errors(argv: list[str], msg: str, capsys) -> None:
    rc, _, err = _run(argv, capsys)
    assert rc == 2 and msg in err


def test_cli_plot(tmp_path, capsys) -> None:
    path = tmp_path / "p.png"
    rc, _, _ = _run(["--plot", str(path)], capsys)
    assert rc == 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_compare_prints_long_model_names_whole(tmp_path, capsys) -> None:
    deep = tmp_path / "a-directory-with-a-rather-long-name" / "and-another-one-below-it"
    deep.mkdir(parents=True)
    cfg = deep / "micro-with-a-long-file-name.json"
    cfg.write_text('{"preset": "micro"}')
    assert len(str(cfg)) > 80
    rc, out, _ = _run(["--compare", str(cfg), "micro"], capsys)
    assert rc == 0 and str(cfg) in out
    rc, out, _ = _run([str(cfg), "--dense", "1T"], capsys)
    assert rc == 0 and str(cfg) in out
