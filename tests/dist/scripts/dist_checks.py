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
