"""`widemoe convert SRC DST [--dtype bf16|fp32]`: rewrite a Hugging Face model directory.

Typical use: an FP8 DeepSeek-V3/R1/Kimi-K2 directory to a bf16 one that any tool reads. SRC is
checked strictly as ``widemoe.hf.load_pretrained`` checks it (every tensor accounted for, FP8
dequantised on CPU) and written with the names ``widemoe.hf.save_pretrained`` uses (the family's
on-disk names, per-expert keys, MTP layers, an index when sharded, no ``quantization_config``).
Tokenizer files (data only, never code) are copied from SRC.

Memory: the conversion streams (``widemoe.hf.convert``): each output tensor is read, dequantised and
cast on its own and written straight into its shard, so peak memory is about one tensor, never the
model. A 671B FP8 checkpoint converts on a machine with a few GB of RAM.
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
    from widemoe.hf import LoadError, PickleCheckpointError, convert_checkpoint

    src, dst = Path(args.src), Path(args.dst)
    if dst.resolve() == src.resolve():
        print("error: DST must differ from SRC (the source shards are read while writing)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        info = convert_checkpoint(
            src, dst, args.dtype, max_shard_size=args.max_shard_size, ignore=args.ignore
        )
    except (LoadError, PickleCheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for n in info.notices:
        print(f"note: {n}")
    print(
        f"{src} -> {dst}: {info.family}, {info.params / 1e6:.2f}M parameters as {args.dtype} in "
        f"{info.shards} shard(s); {info.tensors} tensors written ({info.dequantized} FP8-dequantised, "
        f"{info.scales} scales consumed), {info.verified_copies} MTP copies verified, "
        f"{info.ignored} ignored; {time.perf_counter() - t0:.1f}s"
    )
    return 0
