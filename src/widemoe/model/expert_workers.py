"""CPU expert-parallel execution for the chunked expert compute of `widemoe.model.experts`: a pool of
single-threaded worker threads, the cut of the expert-sorted rows into chunks, and running the chunks on
the workers with one fp32 accumulator each. Measurements behind the design are in the experts module's
docstring and in the comments below."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

# Chunked expert execution (CPU). Many small per-expert GEMMs each open an OpenMP parallel
# region; on a busy 2-core machine every region waits for a descheduled partner thread, and 2-thread
# small GEMMs fell to 5-6 GFLOP/s while 1-thread ones ran at 20-30 (measured side by side). Splitting the
# experts between single-threaded workers has no per-GEMM barrier and keeps each expert's working set in
# its core's cache; the big elementwise / gather ops stay on the intra-op pool.

_POOL: dict[str, object] = {}


def _worker_init() -> None:
    torch.set_num_threads(1)  # OpenMP/MKL thread counts are per-thread settings: the caller keeps its own


def expert_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of >= `workers` single-threaded workers (rebuilt after a fork)."""
    pool = _POOL.get("pool")
    if pool is None or _POOL["size"] < workers or _POOL["pid"] != os.getpid():
        if pool is not None and _POOL["pid"] == os.getpid():
            pool.shutdown(wait=False)  # type: ignore[attr-defined]
        pool = ThreadPoolExecutor(workers, thread_name_prefix="widemoe-experts", initializer=_worker_init)
        _POOL.update(pool=pool, size=workers, pid=os.getpid())
    return pool  # type: ignore[return-value]


def segment_chunks(counts: list[int], workers: int, min_split: int = 32,
                    quantum: int = 1) -> list[list[tuple[int, int, int]]]:
    """Non-empty experts as (e, start_row, n_rows), cut into <= `workers` contiguous chunks of ~equal rows.

    An expert that straddles a chunk boundary is split there (both parts >= `min_split` rows), so the
    workers get equal rows rather than whole experts: cutting only at expert boundaries left the two
    workers 3-6% apart on configs a/b. A split expert appears in two chunks; the backward sums its dW.
    """
    total = sum(counts)
    workers = max(1, min(workers, total))
    chunks: list[list[tuple[int, int, int]]] = [[] for _ in range(workers)]
    s = cur = 0
    for e, n in enumerate(counts):
        while n:
            cur = max(cur, min(s * workers // total, workers - 1))
            end = (cur + 1) * total // workers  # the current chunk's target end row
            take = n
            if s + n > end and cur < workers - 1:
                before = (end - s) // quantum * quantum  # split pieces keep the plan's row quantum
                after = n - before
                if min(before, after) >= min_split:
                    take = before
                elif before < after:  # too small to split: the expert starts the next chunk
                    cur += 1
                    continue
            chunks[cur].append((e, s, take))
            s, n = s + take, n - take
    return [c for c in chunks if c]


def parallel(fn: Callable[[int], None], n: int) -> None:
    """Run fn(0..n-1), one worker thread each when n > 1."""
    if n <= 1:
        for i in range(n):
            fn(i)
        return
    inference = torch.is_inference_mode_enabled()

    def run(i: int) -> None:
        # grad mode is thread-local: without this, W[e] on a parameter would record autograd in the worker
        with torch.inference_mode() if inference else torch.no_grad():
            fn(i)

    pool = expert_pool(n)
    for f in [pool.submit(run, i) for i in range(n)]:
        f.result()


def run_on_workers(run_chunk: Callable[[int, torch.Tensor | None], None], n_chunks: int, workers: int,
                   new_acc: Callable[[], torch.Tensor] | None) -> list[torch.Tensor]:
    """Chunk c runs on worker c mod W (W = min(workers, n_chunks)), as run_chunk(c, acc) with that worker's
    fp32 accumulator from `new_acc` (None: no accumulator, and an empty list back). The accumulators are
    allocated here, on the calling thread (glibc's main arena, see `plan_chunks`), and zeroed by their
    worker: an OpenMP region on the caller right before the workers start leaves its partner thread
    spinning on one of their cores."""
    W = max(1, min(workers, n_chunks))
    accs = [] if new_acc is None else [new_acc() for _ in range(W)]

    def run(w: int) -> None:
        acc = accs[w] if accs else None
        if acc is not None:
            acc.zero_()
        for c in range(w, n_chunks, W):
            run_chunk(c, acc)

    parallel(run, W)
    return accs


# Largest buffer a worker thread allocates per chunk. glibc gives each thread its own arena, whose heaps
# are capped at 64 MB; with mmap off (widemoe.runtime) a larger request takes a slow path (config b of
# benchmarks/moe_layer.py, T=8192, fp32 forward: 545 ms with two chunks, vs 309 ms with one arena).
CHUNK_BYTES = 48 << 20


def plan_chunks(counts: list[int], workers: int, width: int, element_size: int,
                quantum: int = 1) -> list[list[tuple[int, int, int]]]:
    """`segment_chunks` of the rows per expert into a multiple of `workers` chunks, each chunk's
    [rows, width] buffers under `CHUNK_BYTES` (width: the widest per-row buffer, max(D, 2I)); split
    experts keep the segments' row `quantum`."""
    rows_max = max(1, CHUNK_BYTES // (width * element_size))
    pieces = workers * max(1, math.ceil(sum(counts) / (rows_max * workers)))
    return segment_chunks(counts, pieces, quantum=quantum)


__all__ = ["CHUNK_BYTES", "expert_pool", "parallel", "plan_chunks", "run_on_workers", "segment_chunks"]
