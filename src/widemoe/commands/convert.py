"""`widemoe convert SRC DST [--dtype bf16|fp32]`: rewrite a Hugging Face model directory.

Typical use: an FP8 DeepSeek-V3/R1/Kimi-K2 directory to a bf16 one that any tool reads. SRC is loaded
strictly through ``widemoe.hf.load_pretrained`` (every tensor accounted for, FP8 dequantised on CPU),
and written by ``widemoe.hf.save_pretrained`` with the family's on-disk names, per-expert keys, MTP
layers, an index when sharded, and no ``quantization_config``. Tokenizer files (data only, never
code) are copied from SRC.

Memory: the converted model is held once (built empty, filled tensor by tensor), so the machine needs
about the size of the output plus one tensor.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face MoE checkpoint (e.g. FP8 -> bf16)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", type=Path, help="source Hugging Face model directory")
    p.add_argument("dst", type=Path, help="destination directory (created)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="dtype of the written weights")
    p.add_argument("--max-shard-size", default="5GB", help="shard the weights above this size (default 5GB)")
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="REGEX",
        help="skip source tensors (or leave model tensors zero) matching REGEX; repeatable",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from widemoe.config import ConfigError
    from widemoe.hf import LoadError, PickleCheckpointError, load_pretrained, save_pretrained

    src, dst = Path(args.src), Path(args.dst)
    if dst.resolve() == src.resolve():
        print("error: DST must differ from SRC (the source shards are read while writing)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        model = load_pretrained(src, dtype=args.dtype, ignore=args.ignore)
    except (LoadError, PickleCheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    rep = model.load_report
    t1 = time.perf_counter()
    save_pretrained(model, dst, max_shard_size=args.max_shard_size, tokenizer=src)
    t2 = time.perf_counter()
    for n in rep.notices:
        print(f"note: {n}")
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{src} -> {dst}: {rep.family}, {n_params / 1e6:.2f}M parameters as {args.dtype}; "
        f"{rep.tensors_read} tensors read ({rep.dequantized} FP8-dequantised, {rep.scales} scales), "
        f"{len(rep.verified_copies)} MTP copies verified, {len(rep.ignored)} ignored; "
        f"load {t1 - t0:.1f}s, save {t2 - t1:.1f}s"
    )
    return 0
