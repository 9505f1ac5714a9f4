"""Training metrics: the `metrics.jsonl` writer, the matmul peak that MFU is measured against, FLOPs/token.

MFU here is model FLOPs (6·N_active per token plus the attention term, from `widemoe.cost`) per second
divided by the peak this machine reaches on a large square matmul in the training dtype, measured at
start-up: on a shared CPU that is a more honest ceiling than a datasheet number.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from widemoe.config import ModelConfig


class MetricsWriter:
    """Appends one JSON object per line and flushes it, so a crash loses at most the line being written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dropped_torn_tail = self._drop_torn_tail()

    def _drop_torn_tail(self) -> int:
        """Cut a last line without its newline (a crash mid-write), so that the next record does not
        run into it; the torn record cannot be recovered. Returns the bytes dropped."""
        if not self.path.is_file():
            return 0
        data = self.path.read_bytes()
        if not data or data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        with open(self.path, "r+b") as f:
            f.truncate(keep)
        return len(data) - keep

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": time.time(), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


class NullMetrics:
    """The metrics writer of ranks other than 0: records are written once, by rank 0."""

    dropped_torn_tail = 0

    def write(self, record: dict[str, Any]) -> None:
        pass


def read_metrics(path: str | Path, bad_lines: list[int] | None = None) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl. A torn last line (a crash mid-write) is skipped; the numbers of
    other lines that are not JSON objects are appended to `bad_lines` (they are skipped too, but a
    reader must say so: a lost eval record changes what a report concludes)."""
    out = []
    bad: list[int] = []
    last = 0
    with open(path, errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            last = n
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if isinstance(rec, dict):
                out.append(rec)
            else:
                bad.append(n)
    if bad_lines is not None:
        bad_lines.extend(n for n in bad if n != last)
    return out


def measure_matmul_peak(dtype=None, n: int = 1024, min_time: float = 0.2, device=None) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` (default fp32) on `device` (default the CPU), best of a
    few repetitions."""
    import torch  # deferred: `widemoe report` reads metrics without needing torch

    dtype = dtype or torch.float32
    dev = torch.device(device if device is not None else "cpu")
    sync = dev.type == "cuda"  # CUDA matmuls are asynchronous: time them to completion
    a = torch.randn(n, n).to(device=dev, dtype=dtype)
    b = torch.randn(n, n).to(device=dev, dtype=dtype)
    torch.mm(a, b)  # warm-up
    best = 0.0
    deadline = time.perf_counter() + min_time
    while True:
        if sync:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if sync:
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        best = max(best, 2 * n**3 / dt)
        if time.perf_counter() > deadline:
            return best


def train_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    from widemoe.cost import flops_per_token

    return flops_per_token(config, seq_len).train
