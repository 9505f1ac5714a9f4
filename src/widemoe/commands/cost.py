"""`widemoe cost MODEL`: parameters, FLOPs, memory, KV cache, training and serving cost of a model.

MODEL is a preset name, a widemoe config file, a Hugging Face config.json or a HF model directory.
`--compare A B C` puts models side by side (with dense contrast rows), `--published` prints the
published figures beside the computed ones, `--json` prints the same numbers for machines, and
`--plot PATH` draws total vs active parameters of every preset. The arithmetic is `widemoe.cost`;
this file only gathers it per model (`summary`) and renders it. Sizes in bytes are decimal (GB = 1e9).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

from widemoe.config import ConfigError, ModelConfig
from widemoe.cost import (
    BYTES,
    GPT5_CLASS_DENSE,
    GPUS,
    PUBLISHED,
    V3_TRAINING,
    CostError,
    DenseContrast,
    check_published,
    count_params,
    flops_per_token,
    get_gpu,
    gpu_hours,
    implied_mfu,
    kv_bytes,
    kv_elements_per_token_layer,
    kv_uncompressed_elements_per_token_layer,
    load_config,
    mtp_redundant_copies,
    parse_amount,
    parse_context,
    serving_gpus,
    training_bytes_per_gpu,
    training_flops,
    v3_implied_mfu,
    weight_bytes,
)
from widemoe.presets import PRESET_NAMES, get_preset

# ----------------------------------------------------------------------------------------------
# gathering: one model's figures as a nested dict (the table and `--json` show the same numbers)


@dataclass(frozen=True)
class Options:
    context: int = 131072  # KV cache and serving context (positions)
    batch: int = 1
    seq_len: int = 4096  # training sequence length (sets the attention term)
    tokens: float = 14.8e12  # training tokens D
    gpu: str = "H800"
    mfu: float = 0.4
    precision: str = "bf16"  # the peak that the MFU refers to
    gpu_hours: float | None = None  # a reported figure -> the MFU it implies
    dp: int = 8
    ep: int = 1
    pp: int = 1
    zero: int = 3
    weight_dtype: str = "bf16"  # serving weights
    kv_dtype: str = "bf16"


def summary(c: ModelConfig, o: Options | None = None) -> dict[str, Any]:
    o = o or Options()
    if o.context < 0:
        raise CostError(f"context={o.context} must be >= 0")
    if o.batch < 1 or o.seq_len < 1:
        raise CostError(f"batch={o.batch} and seq_len={o.seq_len} must be >= 1")
    gpu = get_gpu(o.gpu)
    p = count_params(c)
    f = flops_per_token(c, o.seq_len)
    kv_ctx = kv_bytes(c, o.context, o.batch, o.kv_dtype)
    # V4's compressed caches are not linear in the context (a fixed window plus an entry every m
    # tokens): report the average per token at the chosen context.
    kv_tok = kv_ctx / (o.context * o.batch) if c.is_v4 and o.context else kv_bytes(c, 1, 1, o.kv_dtype)
    out: dict[str, Any] = {
        "params": {
            "total": p.main_total,
            "mtp": p.mtp,
            "total_with_mtp": p.total_with_mtp,
            "mtp_redundant_copies_in_checkpoint": mtp_redundant_copies(c),
            "buffers_fp32": p.buffers,
            "active_with_embedding": p.active_with_embedding,
            "active_without_embedding": p.active_without_embedding,
            "matmul_active": p.matmul_active,
            "breakdown_total": p.total,
            "breakdown_active": p.active,
            "mtp_breakdown": p.mtp_total,
        },
        "flops_per_token": {
            "seq_len": o.seq_len,
            "forward_matmul": f.forward_matmul,
            "forward_attention": f.forward_attention,
            "forward": f.forward,
            "train_6n": f.train_matmul,
            "train_attention": f.train_attention,
            "train_mtp": f.train_mtp,
            "train": f.train,
        },
        "memory": {
            "weights": {d: weight_bytes(c, d) for d in BYTES},
            "kv_elements_per_token_layer": kv_elements_per_token_layer(c),
            "kv_uncompressed_elements_per_token_layer": kv_uncompressed_elements_per_token_layer(c),
            "kv_dtype": o.kv_dtype,
            "kv_bytes_per_token": kv_tok,
            "context": o.context,
            "batch": o.batch,
            "kv_bytes_at_context": kv_ctx,
            # the same context in DeepSeek-V3's MLA cache, for contrast with V4's compressed caches
            "deepseek_v3_kv_bytes_at_context": (
                kv_bytes(get_preset("deepseek-v3"), o.context, o.batch, o.kv_dtype) if c.is_v4 else None
            ),
            "training_per_gpu": {
                "dp": o.dp,
                "ep": o.ep,
                "pp": o.pp,
                "zero": o.zero,
                **training_bytes_per_gpu(c, o.dp, o.ep, o.pp, o.zero),
            },
        },
        "training": {
            "tokens": o.tokens,
            "seq_len": o.seq_len,
            "flops": training_flops(c, o.tokens, o.seq_len),
            "gpu": gpu.name,
            "precision": o.precision,
            "mfu": o.mfu,
            "gpu_hours": gpu_hours(c, o.tokens, o.seq_len, gpu, o.mfu, o.precision),
        },
        "serving": {
            "weight_dtype": o.weight_dtype,
            "kv_dtype": o.kv_dtype,
            "context": o.context,
            "batch": o.batch,
            "gpus": {
                g.name: serving_gpus(c, g, o.context, o.batch, o.weight_dtype, o.kv_dtype)
                for g in GPUS.values()
            },
        },
    }
    if o.gpu_hours is not None:
        out["training"]["reported_gpu_hours"] = o.gpu_hours
        out["training"]["implied_mfu"] = implied_mfu(c, o.tokens, o.seq_len, gpu, o.gpu_hours, o.precision)
    return out


def dense_summary(d: DenseContrast, o: Options) -> dict[str, Any]:
    """A dense model given only by its count: every parameter active, FLOPs 2N (6N training)."""
    g = get_gpu(o.gpu)
    train = 6 * d.params * o.tokens
    return {
        "name": d.name,
        "note": d.note,
        "params": d.params,
        "forward_flops_per_token": d.forward_flops_per_token(),
        "train_flops_per_token": 6 * d.params,
        "weights": {k: d.weight_bytes(k) for k in BYTES},
        "gpu_hours": train
        / (o.mfu * (g.bf16_tflops if o.precision == "bf16" else g.fp8_tflops) * 1e12)
        / 3600,
    }


# ----------------------------------------------------------------------------------------------
# formatting


def _n(x: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3f}{unit}" if unit in "TB" else f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _bytes(x: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f} B"


def _flops(x: float) -> str:
    return f"{x / 1e9:.2f} GFLOP" if x < 1e15 else f"{x:.3e} FLOP"


def _table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...] = ("quantity", "value", "note")):
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_lines=False)
    for i, h in enumerate(header):
        text = i == 0 or h in ("note", "status", "quantity (convention)")
        t.add_column(h, justify="left" if text else "right")
    for r in rows:
        t.add_row(*r)
    return t


def render_one(console: Any, name: str, c: ModelConfig, s: dict[str, Any], o: Options) -> None:
    p, f, m, tr, sv = s["params"], s["flops_per_token"], s["memory"], s["training"], s["serving"]
    total = p["total"] or 1
    rows = [
        (
            k.replace("_", " "),
            _n(p["breakdown_total"][k]),
            _n(p["breakdown_active"][k]),
            f"{p['breakdown_total'][k] / total:.1%}",
        )
        for k in p["breakdown_total"]
    ]
    if p["mtp"]:
        rows.append(
            ("MTP modules (apart)", _n(p["mtp"]), "0 (dropped at inference)", f"{p['mtp'] / total:.1%}")
        )
    console.print(
        _table(f"{name}: parameters by component", rows, ("component", "total", "active/token", "share"))
    )
    rows = [
        ("total (main model)", _n(p["total"]), "memory is sized by this"),
        (
            "active, with input embedding",
            _n(p["active_with_embedding"]),
            "Qwen3, Mixtral, OLMoE publish this one",
        ),
        (
            "active, without input embedding",
            _n(p["active_without_embedding"]),
            "DeepSeek-V3 (37B, 36.7B), Kimi K2, V2-Lite publish this one",
        ),
    ]
    if p["mtp"]:
        rows += [
            ("MTP modules (unique)", _n(p["mtp"]), "embedding and head shared with the main model"),
            ("total with MTP", _n(p["total_with_mtp"]), "= sum of numel of WideMoeForCausalLM"),
            (
                "+ redundant emb/head copies",
                _n(p["mtp_redundant_copies_in_checkpoint"]),
                "stored per MTP layer in real DeepSeek checkpoints, shared in widemoe",
            ),
        ]
    if p["buffers_fp32"]:
        rows.append(
            ("fp32 router bias buffers", _n(p["buffers_fp32"]), "e_score_correction_bias, not parameters")
        )
    console.print(_table(f"{name}: parameters", rows))
    rows = [
        ("forward, matmuls 2·N", _flops(f["forward_matmul"]), f"N = {_n(p['matmul_active'])} matmul weights"),
        (
            f"forward, attention at T={f['seq_len']}",
            _flops(f["forward_attention"]),
            "causal mean context (T+1)/2",
        ),
        ("forward", _flops(f["forward"]), ""),
        ("training, 6·N", _flops(f["train_6n"]), "the 6N rule"),
        ("training, attention", _flops(f["train_attention"]), "grows with T"),
        ("training, MTP", _flops(f["train_mtp"]), "MTP modules run in training"),
        ("training", _flops(f["train"]), "3 x forward"),
    ]
    console.print(_table(f"{name}: FLOPs per token", rows))
    rows = [
        (
            f"weights {d}",
            _bytes(v),
            "linear layers quantised, rest bf16, router fp32" if d in ("fp8", "fp4") else "",
        )
        for d, v in m["weights"].items()
    ]
    ratio = m["kv_uncompressed_elements_per_token_layer"] / m["kv_elements_per_token_layer"]
    rows += [
        (
            "KV elements / token / layer",
            str(m["kv_elements_per_token_layer"]),
            f"MLA latent + rope; expanded K,V would be {ratio:.0f}x"
            if c.is_mla
            else "2 x kv_heads x head_dim",
        ),
        (
            f"KV cache / token ({m['kv_dtype']})",
            _bytes(m["kv_bytes_per_token"]),
            f"{c.num_hidden_layers} layers",
        ),
        (f"KV cache at {m['context']:,} x batch {m['batch']}", _bytes(m["kv_bytes_at_context"]), ""),
        *(
            [
                (
                    f"DeepSeek-V3 MLA cache at {m['context']:,}",
                    _bytes(m["deepseek_v3_kv_bytes_at_context"]),
                    "for contrast",
                )
            ]
            if m.get("deepseek_v3_kv_bytes_at_context")
            else []
        ),
    ]
    t = m["training_per_gpu"]
    rows.append(
        (
            f"AdamW training / GPU (dp={t['dp']} ep={t['ep']} pp={t['pp']} zero={t['zero']})",
            _bytes(t["total"]),
            "weights + grads + optimizer; activations not included",
        )
    )
    console.print(_table(f"{name}: memory", rows))
    rows = [
        (f"compute for {tr['tokens']:.3g} tokens", f"{tr['flops']:.3e} FLOP", f"seq_len {tr['seq_len']}"),
        (
            f"GPU-hours on {tr['gpu']} at MFU {tr['mfu']:.0%} ({tr['precision']})",
            f"{tr['gpu_hours']:,.0f}",
            "",
        ),
    ]
    if "implied_mfu" in tr:
        rows.append(
            (
                f"MFU implied by {tr['reported_gpu_hours']:,.0f} GPU-hours",
                f"{tr['implied_mfu']:.1%}",
                f"of the {tr['precision']} peak",
            )
        )
    rows += [
        (
            f"serving GPUs: {g} ({sv['weight_dtype']} weights, {sv['context']:,} ctx x {sv['batch']})",
            str(n),
            f"{GPUS[g.lower()].memory_gb:g} GB each, 90% usable",
        )
        for g, n in sv["gpus"].items()
    ]
    console.print(_table(f"{name}: training and serving", rows))


COMPARE_ROWS: tuple[tuple[str, Any], ...] = (
    ("total params", lambda s: _n(s["params"]["total"])),
    ("active (with emb)", lambda s: _n(s["params"]["active_with_embedding"])),
    ("active (without emb)", lambda s: _n(s["params"]["active_without_embedding"])),
    ("forward FLOP/token", lambda s: _flops(s["flops_per_token"]["forward"])),
    ("training FLOP/token", lambda s: _flops(s["flops_per_token"]["train"])),
    ("weights bf16", lambda s: _bytes(s["memory"]["weights"]["bf16"])),
    ("weights fp8", lambda s: _bytes(s["memory"]["weights"]["fp8"])),
    ("KV / token", lambda s: _bytes(s["memory"]["kv_bytes_per_token"])),
    ("KV at context", lambda s: _bytes(s["memory"]["kv_bytes_at_context"])),
    ("GPU-hours for D tokens", lambda s: f"{s['training']['gpu_hours']:,.0f}"),
)


def render_compare(
    console: Any, names: list[str], sums: list[dict[str, Any]], dense: list[dict[str, Any]], o: Options
) -> None:
    header = ("quantity", *names, *(d["name"] for d in dense))
    rows = []
    for label, fn in COMPARE_ROWS:
        dense_cells = {
            "total params": lambda d: _n(d["params"]),
            "active (with emb)": lambda d: _n(d["params"]),
            "active (without emb)": lambda d: _n(d["params"]),
            "forward FLOP/token": lambda d: _flops(d["forward_flops_per_token"]),
            "training FLOP/token": lambda d: _flops(d["train_flops_per_token"]),
            "weights bf16": lambda d: _bytes(d["weights"]["bf16"]),
            "weights fp8": lambda d: _bytes(d["weights"]["fp8"]),
            "GPU-hours for D tokens": lambda d: f"{d['gpu_hours']:,.0f}",
        }
        rows.append(
            (
                label,
                *(fn(s) for s in sums),
                *(dense_cells[label](d) if label in dense_cells else "-" for d in dense),
            )
        )
    for g in GPUS.values():
        rows.append(
            (
                f"serving GPUs {g.name}",
                *(str(s["serving"]["gpus"][g.name]) for s in sums),
                *("-" for _ in dense),
            )
        )
    title = (
        f"context {o.context:,} x batch {o.batch}, D = {o.tokens:.3g} tokens on {o.gpu} at MFU {o.mfu:.0%}; "
        "dense rows: all parameters active"
    )
    console.print(_table(title, rows, header))


def render_published(console: Any) -> None:
    rows = []
    for fig in PUBLISHED:
        r = check_published(fig)
        rows.append(
            (
                r["model"],
                r["quantity"].replace("_", " "),
                r["published_text"],
                _n(r["computed"]),
                f"{r['deviation']:+.2%}",
                r["status"],
                r["note"] or "-",
            )
        )
    console.print(
        _table(
            "published vs computed",
            rows,
            ("model", "quantity (convention)", "published", "computed", "dev.", "status", "note"),
        )
    )
    mfu, t = v3_implied_mfu(), V3_TRAINING
    console.print(
        f"DeepSeek-V3 training: {t['tokens']:.3g} tokens at seq {t['seq_len']} on H800: "
        f"{t['gpu_hours_total'] / 1e6:.3f}M GPU-hours imply MFU {mfu['total_bf16']:.1%} of the bf16 peak "
        f"({mfu['total_fp8']:.1%} of fp8); pre-training alone ({t['gpu_hours_pretraining'] / 1e6:.3f}M) "
        f"{mfu['pretraining_bf16']:.1%} ({mfu['pretraining_fp8']:.1%} of fp8)."
    )


_LABEL_OFFSETS = {"v4-seed": (6, -11), "deepseek-v3": (-70, 4)}  # keep close neighbours apart


def plot_presets(path: str) -> None:
    """Total vs active parameters (log-log) of every real-size preset, with the dense line y = x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name in PRESET_NAMES:
        p = count_params(get_preset(name))
        if p.main_total < 1e9:
            continue  # tiny/micro test sizes would stretch the axes
        ax.scatter(p.main_total, p.active_with_embedding, color="tab:blue")
        ax.annotate(
            name,
            (p.main_total, p.active_with_embedding),
            textcoords="offset points",
            xytext=_LABEL_OFFSETS.get(name, (5, 3)),
            fontsize=8,
        )
    d = GPT5_CLASS_DENSE.params
    ax.scatter(d, d, color="tab:red", marker="s")
    ax.annotate(GPT5_CLASS_DENSE.name, (d, d), textcoords="offset points", xytext=(-60, 5), fontsize=8)
    ax.plot(
        [1e9, 3e12], [1e9, 3e12], color="gray", linestyle="--", linewidth=1, label="dense (active = total)"
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("total parameters")
    ax.set_ylabel("active parameters per token (with input embedding)")
    ax.set_title("widemoe presets: total vs active parameters")
    ax.legend(loc="upper left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# command line


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "cost",
        help="parameters, FLOPs, memory, KV cache and training cost of a model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("models", nargs="*", metavar="MODEL", help="preset name, config.json or HF directory")
    p.add_argument("--compare", nargs="+", metavar="MODEL", default=[], help="models side by side")
    p.add_argument("--context", default="128k", help="KV/serving context; k = 1024 (128k = 131072)")
    p.add_argument("--batch", type=int, default=1, help="sequences held in the KV cache (default 1)")
    p.add_argument("--seq-len", default="4k", help="training sequence length (attention term; default 4k)")
    p.add_argument("--tokens", default="14.8T", help="training tokens D, decimal (default 14.8T)")
    p.add_argument("--gpu", default="H800", help=f"one of {', '.join(g.name for g in GPUS.values())}")
    p.add_argument(
        "--mfu", type=float, default=0.4, help="model FLOPs utilisation for GPU-hours (default 0.4)"
    )
    p.add_argument("--precision", choices=("bf16", "fp8"), default="bf16", help="peak the MFU refers to")
    p.add_argument(
        "--gpu-hours", default=None, help="reported GPU-hours (e.g. 2.788M): print the implied MFU"
    )
    p.add_argument("--dp", type=int, default=8, help="data-parallel GPUs for training memory (default 8)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel degree, divides dp (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1)")
    p.add_argument("--zero", type=int, choices=(1, 3), default=3, help="3 = FSDP (default), 1 = ZeRO-1")
    p.add_argument("--weight-dtype", choices=tuple(BYTES), default="bf16", help="serving weight format")
    p.add_argument("--kv-dtype", choices=tuple(BYTES), default="bf16", help="KV cache element format")
    p.add_argument(
        "--dense",
        action="append",
        default=[],
        metavar="PARAMS",
        help="add a dense contrast row of this size (e.g. 1.8T); repeatable",
    )
    p.add_argument("--published", action="store_true", help="published vs computed figures for the presets")
    p.add_argument("--plot", metavar="PATH", help="write a total-vs-active plot of the presets to PATH")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def options_from_args(args: argparse.Namespace) -> Options:
    if args.batch < 1:
        raise CostError(f"--batch={args.batch} must be >= 1")
    if not 0 < args.mfu <= 1:
        raise CostError(f"--mfu={args.mfu} must be in (0, 1]")
    seq = parse_context(args.seq_len, "--seq-len")
    if seq < 1:
        raise CostError(f"--seq-len={args.seq_len} must be >= 1")
    get_gpu(args.gpu)
    hours = parse_amount(args.gpu_hours, "--gpu-hours") if args.gpu_hours is not None else None
    return Options(
        context=parse_context(args.context, "--context"),
        batch=args.batch,
        seq_len=seq,
        tokens=parse_amount(args.tokens, "--tokens"),
        gpu=args.gpu,
        mfu=args.mfu,
        precision=args.precision,
        gpu_hours=hours,
        dp=args.dp,
        ep=args.ep,
        pp=args.pp,
        zero=args.zero,
        weight_dtype=args.weight_dtype,
        kv_dtype=args.kv_dtype,
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    try:
        o = options_from_args(args)
        names = list(args.models) + list(args.compare)
        if not names and not (args.published or args.plot):
            raise CostError(
                "give a MODEL (a preset: "
                + ", ".join(PRESET_NAMES)
                + "; or a config.json / HF directory), --compare A B, --published or --plot PATH"
            )
        configs = [(n, load_config(n)) for n in names]
        sums = [summary(c, o) for _, c in configs]
        dense = [
            DenseContrast(f"dense-{d}", parse_amount(d, "--dense"), "dense, all active") for d in args.dense
        ]
        if args.compare and not dense:
            dense = [GPT5_CLASS_DENSE]
        dense_sums = [dense_summary(d, o) for d in dense]
        if args.plot:
            plot_presets(args.plot)
    except (CostError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        out: dict[str, Any] = {"options": o.__dict__, "models": dict(zip(names, sums)), "dense": dense_sums}
        if args.published:
            out["published"] = [check_published(f) for f in PUBLISHED]
            out["deepseek_v3_implied_mfu"] = v3_implied_mfu()
        print(json.dumps(out, indent=2))
        return 0
    if len(configs) == 1 and not args.compare:
        render_one(console, names[0], configs[0][1], sums[0], o)
        if dense_sums:
            render_compare(console, names, sums, dense_sums, o)
    elif configs:
        render_compare(console, names, sums, dense_sums, o)
    if args.published:
        render_published(console)
    if args.plot:
        console.print(f"wrote {args.plot}")
    return 0
