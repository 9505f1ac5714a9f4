"""`widemoe export RUN DST [--dtype fp32|bf16] [--overwrite]`: a training checkpoint as a full Hugging Face
directory.

RUN is a training run directory (its newest committed checkpoint is exported) or one checkpoint directory
(``RUN/checkpoints/step-XXXXXXXX``). The checkpoint is a sharded Distributed Checkpoint (DCP), written by
`widemoe train` under torchrun at any number of processes and any expert-parallel degree; it is read here
in ONE process, without torchrun, into a plain model built from the checkpoint's config.json (the
checkpoint of a one-process run, already a Hugging Face directory, is read as one), and written
with the family's on-disk names (what ``widemoe.hf.save_pretrained`` writes: config.json, safetensors,
tokenizer), loadable by transformers and by `widemoe generate DST`.

Safety: DST and the checkpoint are checked before DST is touched; the directory is written beside DST and
swapped in only when complete, so an error or a kill leaves DST as it was. A non-empty DST is refused
unless --overwrite, which replaces its model files and keeps everything else. Nothing pickled runs: the
checkpoint's files are read as plain data only.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="write a training checkpoint (DCP, any layout) as a Hugging Face directory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", type=Path, metavar="RUN",
                   help="training run directory (its newest committed checkpoint), or a checkpoint directory")
    p.add_argument("dst", type=Path, metavar="DST", help="destination directory (created; see --overwrite)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="dtype of the written weights (default fp32: the training weights, lossless)")
    p.add_argument("--overwrite", action="store_true",
                   help="DST may be a non-empty directory: replace its model files (weights, config.json, "
                   "tokenizer), keep its other files")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from widemoe.train.dcp import export_checkpoint

    t0 = time.perf_counter()
    info = export_checkpoint(args.run, args.dst, dtype=args.dtype, overwrite=args.overwrite)
    if info.checkpoint != args.run:
        print(f"note: run directory {args.run}: exporting its newest committed checkpoint, "
              f"{info.checkpoint.name}")
    for n in info.notices:
        print(f"note: {n}")
    print(f"{info.checkpoint} -> {info.dst}: step {info.step}, {info.family}, {info.params / 1e6:.2f}M "
          f"parameters as {info.dtype}; {time.perf_counter() - t0:.1f}s")
    return 0
