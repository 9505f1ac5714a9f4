"""`widemoe inspect DIR`: what a Hugging Face MoE checkpoint holds, without reading its weights.

Reads config.json and the safetensors headers only (no tensor data), then prints: the family, the
routing and attention setup, a layer table, parameter counts (total / active per token, from
``widemoe.cost``), dtypes and bytes on disk, MTP modules, FP8 quantisation, and anything odd: config
notices (ignored remote code, unused fields) and a dry run of the loader's strict accounting against
the model built on ``meta`` (missing / unexpected / mis-shaped tensors). Exit status 1 when the
directory would not load.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect",
        help="summarise a Hugging Face MoE checkpoint directory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", type=Path, help="Hugging Face model directory")
    p.set_defaults(func=run)
    return p


def _fmt_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _fmt_bytes(n: float) -> str:
    for unit, div in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{int(n)} B"


def _layer_rows(cfg) -> list[tuple[str, str, str]]:  # noqa: ANN001
    attn = (
        "MLA"
        if cfg.is_mla
        else f"V4 MQA {cfg.num_attention_heads}x{cfg.head_dim}, window {cfg.sliding_window}"
        if cfg.is_v4
        else f"GQA {cfg.num_attention_heads}/{cfg.kv_heads}"
        + (f" qk-norm {cfg.qk_norm}" if cfg.qk_norm != "none" else "")
    )
    moe = f"MoE {cfg.n_routed_experts}x{cfg.moe_intermediate_size} top-{cfg.num_experts_per_tok}" + (
        f" + {cfg.n_shared_experts} shared" if cfg.n_shared_experts else ""
    )
    dense = f"dense SwiGLU {cfg.intermediate_size}"
    kinds = [moe if cfg.is_moe_layer(i) else dense for i in range(cfg.num_hidden_layers)]
    rows, start = [], 0
    for i in range(1, len(kinds) + 1):
        if i == len(kinds) or kinds[i] != kinds[start]:
            rng = str(start) if i - 1 == start else f"{start}-{i - 1}"
            rows.append((rng, attn, kinds[start]))
            start = i
    L = cfg.num_hidden_layers
    for k in range(cfg.num_nextn_predict_layers):
        rows.append((str(L + k), attn, f"MTP module {k}: {moe if cfg.moe_layer_indices else dense}"))
    return rows


def run(args: argparse.Namespace) -> int:
    from widemoe.config import ConfigError
    from widemoe.cost import count_params
    from widemoe.hf import fp8 as fp8mod
    from widemoe.hf.config_map import hf_to_model_config
    from widemoe.hf.loader import (
        LoadError,
        PickleCheckpointError,
        drop_absent_mtp,
        find_weight_files,
        model_targets,
        mtp_keys,
        plan_load,
        read_hf_config,
        read_tensor_table,
        target_shapes,
    )
    from widemoe.model.transformer import build_model

    path = Path(args.dir)
    try:
        hf = read_hf_config(path)
        cfg, notices = hf_to_model_config(hf, source=str(path / "config.json"))
        spec = fp8mod.parse_quantization_config(
            hf.get("quantization_config"), source=str(path / "config.json")
        )
        files = find_weight_files(path)
        table = read_tensor_table(path, files)
    except (ConfigError, PickleCheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    out: list[str] = [f"{path}"]
    out.append(
        f"  family        {cfg.model_type} (model_type {hf.get('model_type')!r}, architectures "
        f"{hf.get('architectures')})"
    )
    out.append(
        f"  size          vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_attention_heads} heads, tied embeddings: {cfg.tie_word_embeddings}"
    )
    out.append(
        f"  routing       {cfg.scoring_func} / {cfg.topk_method}, groups {cfg.n_group}/{cfg.topk_group}, "
        f"norm_topk_prob {cfg.norm_topk_prob}, scale {cfg.routed_scaling_factor}"
    )
    rope = f"theta {cfg.rope_theta:g}"
    if cfg.yarn:
        rope += f", YaRN x{cfg.yarn['factor']:g} from {cfg.yarn['original_max_position_embeddings']}"
    out.append(
        f"  positions     {rope}, max {cfg.max_position_embeddings}, "
        f"{'interleaved' if cfg.rope_interleave else 'rotate-half'} RoPE"
    )
    pc = count_params(cfg)
    out.append(
        f"  parameters    total {_fmt_count(pc.main_total)} + MTP {_fmt_count(pc.mtp)}, "
        f"active/token {_fmt_count(pc.active_with_embedding)} "
        f"({_fmt_count(pc.active_without_embedding)} without the embedding)"
    )
    by_dtype: Counter[str] = Counter()
    bytes_dtype: Counter[str] = Counter()
    for info in table.values():
        name = str(info.dtype).replace("torch.", "")
        by_dtype[name] += 1
        bytes_dtype[name] += info.end - info.start
    total_bytes = sum(bytes_dtype.values())
    out.append(
        f"  weights       {len(files)} file(s), {len(table)} tensors, {_fmt_bytes(total_bytes)}: "
        + ", ".join(f"{k} {by_dtype[k]} ({_fmt_bytes(bytes_dtype[k])})" for k in sorted(by_dtype))
    )
    if spec:
        n_scales = sum(k.endswith("_scale_inv") for k in table)
        out.append(
            f"  quantisation  fp8 e4m3, block {list(spec.block)}{', ue8m0 scales' if spec.ue8m0 else ''}, "
            f"{n_scales} scale tensors (dequantised on load)"
        )
    L = cfg.num_hidden_layers
    mtp = mtp_keys(table, L)
    where = "mtp.{k}" if cfg.is_v4 else f"model.layers.{L}+"
    if cfg.num_nextn_predict_layers:
        state = (
            f"{len(mtp)} tensors present" if mtp else "absent from the weights (loaded without MTP)"
        )
        out.append(f"  MTP           {cfg.num_nextn_predict_layers} module(s) at {where}: {state}")
    out.append("  layers")
    rows = _layer_rows(cfg)
    w = max(len(r[0]) for r in rows)
    for rng, attn, ffn in rows:
        out.append(f"    {rng:>{w}}  {attn:<12} {ffn}")

    odd = list(notices)
    cfg, _ = drop_absent_mtp(cfg, table)  # the MTP line above already says they are absent
    meta = build_model(cfg, device="meta")
    targets = target_shapes(model_targets(meta))
    ok = True
    try:
        plan_load(cfg, targets, table, fp8=spec, path=str(path))
    except LoadError as e:
        ok = False
        odd.append(str(e))
    out.append(
        "  accounting    "
        + (
            "OK: every tensor maps onto the model and every parameter is covered"
            if ok
            else "FAILS: the directory would not load (see below)"
        )
    )
    for n in odd:
        out.append(f"  note          {n}")
    print("\n".join(out))
    return 0 if ok else 1
