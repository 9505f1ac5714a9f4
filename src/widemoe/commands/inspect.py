"""`widemoe inspect DIR`: what a Hugging Face MoE checkpoint holds, without reading its weights.

DIR is a Hugging Face model directory, or a training run directory (its newest committed checkpoint).

Reads config.json and the safetensors headers (tensor data only to verify redundant copies, such as
DeepSeek's MTP embed/head), then prints: the family, the routing and attention setup, a layer table,
parameter counts (total / active per token, from ``widemoe.cost``), dtypes and bytes on disk, MTP
modules, FP8 quantisation, and anything odd: config notices (ignored remote code, unused fields) and
the loader's own strict accounting against the model built on ``meta`` (missing / unexpected /
mis-shaped tensors, differing copies), so "accounting OK" means `generate` and `convert` load it.
Exit status 1 when the directory would not load (the accounting's problems are printed), or when it
cannot be read at all (a damaged weight file: the message names it). The description itself is
``widemoe.hf.inspect_checkpoint``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect",
        help="summarise a Hugging Face MoE checkpoint directory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "dir",
        type=Path,
        help="Hugging Face model directory, or a training run directory (its newest checkpoint)",
    )
    p.set_defaults(func=run)
    return p


def _fmt_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _checkpoint_dir(path: Path) -> Path:
    """``path``, or a training run directory's newest committed checkpoint (said on stdout)."""
    from widemoe.hf.resolve import checkpoint_dir_of

    found = checkpoint_dir_of(path)
    if found != path:
        print(f"run directory {path}: its newest committed checkpoint, {found.name}")
    return found


def run(args: argparse.Namespace) -> int:
    from widemoe.commands.errors import report_error
    from widemoe.cost import count_params
    from widemoe.hf import inspect_checkpoint

    insp = inspect_checkpoint(_checkpoint_dir(args.dir))  # damaged or unreadable: widemoe.cli says why
    pc = count_params(insp.declared)
    params = (
        f"  parameters    total {_fmt_count(pc.main_total)} + MTP {_fmt_count(pc.mtp)}, "
        f"active/token {_fmt_count(pc.active_with_embedding)} "
        f"({_fmt_count(pc.active_without_embedding)} without the embedding)"
    )
    print("\n".join([str(insp.path), *insp.head, params, *insp.body]))
    if insp.error is not None:  # the description above, then the loader's refusal as the error line
        return report_error(insp.error)
    return 0
