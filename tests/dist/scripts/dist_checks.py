"""Helpers for the scripts that tests/dist launches under torchrun."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

MARK = "WIDEMOE_RESULT "


def report(name: str, value: object) -> None:
    """Print one result from rank 0 (the launcher collects it)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(MARK + json.dumps({"name": name, "value": value}), flush=True)


def max_over_ranks(x: float) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 when both are zero)."""
    a, b = a.detach().double(), b.detach().double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    err = float((a - b).abs().max()) if b.numel() else 0.0
    return err / scale if scale > 0 else err


def finish() -> None:
    """Barrier + destroy the process group, then leave without the interpreter's teardown: about one
    4-rank gloo launch in eight aborted after its last line ("terminate called without an active
    exception", a C++ thread destroyed at exit; benchmarks/distributed.py saw it), which would fail a
    test whose checks had all been reported."""
    import os
    import sys

    from widemoe.distributed.env import shutdown

    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
