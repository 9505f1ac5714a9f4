"""`widemoe convert SRC DST [--dtype bf16|fp32]`: rewrite a Hugging Face model directory.

Typical use: an FP8 DeepSeek-V3/R1/Kimi-K2 directory to a bf16 one that any tool reads. SRC is
checked strictly as ``widemoe.hf.load_pretrained`` checks it (every tensor accounted for, FP8
dequantised on CPU) and written with the names ``widemoe.hf.save_pretrained`` uses (the family's
on-disk names, per-expert keys, MTP layers, an index when sharded, no ``quantization_config``).
Tokenizer files (data only, never code) are copied from SRC.

Memory: the conversion streams (``widemoe.hf.convert``): each output tensor is read, dequantised and
cast on its own and written straight into its shard, so peak memory is about one tensor, never the
model. A 671B FP8 checkpoint converts on a machine with a few GB of RAM.

Safety: the options, DST and SRC's accounting are all checked before DST is touched; the output is
written into a temporary directory beside DST and swapped in only when complete, so an error or a
kill leaves DST exactly as it was. A non-empty DST is refused unless --overwrite, which replaces its
model files (weights and index, config.json, generation_config.json, tokenizer files) and keeps
everything else. Errors (a damaged or mismatching SRC, a refused DST) exit with status 1.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path


def _shard_size(text: str) -> str:
    from widemoe.hf.safetensors_io import parse_size

    try:
        parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a positive byte count (examples: 5GB, 500MB, 2GiB, 1000000)"
        ) from None
    return text


def _regex(text: str) -> str:
    try:
        re.compile(text)
    except re.error as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid regular expression ({e})") from None
    return text


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert",
        help="convert a Hugging Face MoE checkpoint (e.g. FP8 -> bf16)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "src", type=Path, help="source Hugging Face model directory, or a training run directory (its newest "
        "committed checkpoint)"
    )
    p.add_argument("dst", type=Path, help="destination directory (created; see --overwrite)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="dtype of the written weights")
    p.add_argument(
        "--max-shard-size",
        type=_shard_size,
        default="5GB",
        help="shard the weights above this size (default 5GB)",
    )
    p.add_argument(
        "--ignore",
        action="append",
        type=_regex,
        default=[],
        metavar="REGEX",
        help="tolerate what the strict accounting would refuse, for names matching REGEX: a checkpoint "
        "tensor the model has no place for (or a redundant copy, then not verified) is skipped, a model "
        "tensor the checkpoint lacks is left zero (both listed); tensors the model loads are always "
        "loaded; repeatable",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="DST may be a non-empty directory: replace its model files (weights, config.json, "
        "tokenizer), keep its other files",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from widemoe.hf import convert_checkpoint
    from widemoe.hf.resolve import checkpoint_dir_of

    dst = Path(args.dst)
    src = checkpoint_dir_of(args.src)
    if src != args.src:
        print(f"note: run directory {args.src}: converting its newest committed checkpoint, {src.name}")
    t0 = time.perf_counter()
    info = convert_checkpoint(
        src, dst, args.dtype, max_shard_size=args.max_shard_size, ignore=args.ignore, overwrite=args.overwrite
    )
    for n in info.notices:
        print(f"note: {n}")
    for n in _ignore_notes(info):
        print(f"note: {n}")
    print(
        f"{src} -> {dst}: {info.family}, {info.params / 1e6:.2f}M parameters as {args.dtype} in "
        f"{info.shards} shard(s); {info.tensors} tensors written ({info.dequantized} FP8-dequantised, "
        f"{info.scales} scales consumed), {info.verified_copies} MTP copies verified, "
        f"{len(info.ignored)} ignored, {len(info.zero_filled)} zero-filled; {time.perf_counter() - t0:.1f}s"
    )
    return 0


def _ignore_notes(info) -> list[str]:  # noqa: ANN001 - a widemoe.hf.convert.ConvertSummary
    """What --ignore did, by name: a skipped or zero-filled tensor must never go unsaid."""
    out = []
    if info.ignored:
        out.append(f"--ignore: skipped {len(info.ignored)} checkpoint tensor(s), neither loaded nor checked: "
                   + ", ".join(info.ignored))
    if info.zero_filled:
        out.append(f"--ignore: left {len(info.zero_filled)} model tensor(s) ZERO, the checkpoint lacks them: "
                   + ", ".join(info.zero_filled))
    for pat in info.unused_ignores:
        out.append(f"--ignore {pat!r} excused nothing: every tensor it matches loads normally (it never "
                   "skips a tensor the model uses)")
    return out
