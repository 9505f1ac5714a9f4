"""`widemoe cost MODEL`: parameters, FLOPs, memory, KV cache, training and serving cost of a model.

MODEL is a preset name, a widemoe config file, a Hugging Face config.json or a HF model directory.
`--compare A B C` puts models side by side (with dense contrast rows), `--published` prints the
published figures beside the computed ones, `--json` prints the same numbers for machines, and
`--plot PATH` draws total vs active parameters of every preset. The arithmetic and the tables are
`widemoe.cost`, the plot `widemoe.report.cost_plot`; this file parses, calls and prints. Sizes in
bytes are decimal (GB = 1e9).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from widemoe.commands.errors import report_error
from widemoe.config import ConfigError
from widemoe.cost import (
    BYTES,
    GPT5_CLASS_DENSE,
    GPUS,
    PUBLISHED,
    CostError,
    DenseContrast,
    Options,
    check_published,
    dense_summary,
    get_gpu,
    parse_amount,
    parse_context,
    summary,
    v3_implied_mfu,
)
from widemoe.presets import PRESET_NAMES

UNBOUNDED_WIDTH = 10_000  # columns for output that is not a terminal


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
    context = parse_context(args.context, "--context")
    if context < 1:  # a KV cache and serving table for no positions is nothing to estimate
        raise CostError(f"--context={args.context} must be >= 1 token")
    tokens = parse_amount(args.tokens, "--tokens")
    if tokens <= 0:
        raise CostError(f"--tokens={args.tokens} must be > 0 (the training tokens D)")
    get_gpu(args.gpu)
    hours = parse_amount(args.gpu_hours, "--gpu-hours") if args.gpu_hours is not None else None
    return Options(
        context=context,
        batch=args.batch,
        seq_len=seq,
        tokens=tokens,
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


def _dense_params(text: str) -> float:
    n = parse_amount(text, "--dense")
    if n < 1:
        raise CostError(f"--dense={text} must be >= 1 parameter")
    return n


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from widemoe.cost.tables import render_compare, render_one, render_published
    from widemoe.hf.resolve import resolve_model  # reads config files; loads torch, so only here

    try:
        o = options_from_args(args)
        names = list(args.models) + list(args.compare)
        if not names and not (args.published or args.plot):
            raise CostError(f"give a MODEL (a preset: {', '.join(PRESET_NAMES)}; or a config.json / HF "
                            "directory), --compare A B, --published or --plot PATH")
        configs = [resolve_model(n).config for n in names]
        sums = [summary(c, o) for c in configs]
        dense = [DenseContrast(f"dense-{d}", _dense_params(d), "dense, all active") for d in args.dense]
        if args.compare and not dense:
            dense = [GPT5_CLASS_DENSE]
        dense_sums = [dense_summary(d, o) for d in dense]
        if args.plot:
            from widemoe.report.cost_plot import plot_presets  # matplotlib loads only for --plot

            plot_presets(args.plot)
    except (CostError, ConfigError) as e:
        return report_error(e)
    if args.json:
        out: dict[str, Any] = {"options": o.__dict__, "models": dict(zip(names, sums)), "dense": dense_sums}
        if args.published:
            out["published"] = [check_published(f) for f in PUBLISHED]
            out["deepseek_v3_implied_mfu"] = v3_implied_mfu()
        print(json.dumps(out, indent=2))
        return 0
    # Not a terminal (a file, a pipe, a test): rich would wrap and cut at 80 columns; tables keep their
    # natural width instead, so model names (config paths) come out whole.
    console = Console() if sys.stdout.isatty() else Console(width=UNBOUNDED_WIDTH)
    if len(configs) == 1 and not args.compare:
        render_one(console, names[0], configs[0], sums[0])
        if dense_sums:
            render_compare(console, names, sums, dense_sums, o)
    elif configs:
        render_compare(console, names, sums, dense_sums, o)
    if args.published:
        render_published(console)
    if args.plot:
        console.print(f"wrote {args.plot}")
    return 0
