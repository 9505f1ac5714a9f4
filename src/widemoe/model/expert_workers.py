"""CPU expert-parallel execution for the chunked expert compute of `widemoe.model.experts`: a pool of
single-threaded worker threads, the cut of the expert-sorted rows into chunks, and running the chunks on
the workers with one fp32 accumulator each; and the decode-size executions that need none of it (a few
token-expert pairs: GEMVs on weight views, or one sort and two grouped GEMMs). Measurements behind the
design are in the experts module's docstring, in benchmarks/decode.py and in the comments below."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

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

# --------------------------------------------------------------------------------------------------
# Decode sizes (no autograd, local dispatch, a few token-expert pairs): no plan, no chunks, no workers.
# Up to DECODE_GEMV_PAIRS pairs run as per-pair GEMVs on views of the stacked weights (`decode_pairs`),
# up to DECODE_MAX_PAIRS as one sort and two grouped GEMMs (`decode_grouped`); more take the chunks.
DECODE_GEMV_PAIRS = 16
DECODE_MAX_PAIRS = 512


def _clamp(h_PF: torch.Tensor, I: int, limit: float | None) -> None:
    """DeepSeek-V4's SwiGLU clamp, in place (as `experts._clamp_`): gate <= limit, |up| <= limit."""
    if limit is not None:
        h_PF[:, :I].clamp_(max=limit)
        h_PF[:, I:].clamp_(min=-limit, max=limit)


@torch.no_grad()
def decode_pairs(x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor, W1: torch.Tensor,
                 W2: torch.Tensor, limit: float | None) -> torch.Tensor:
    """y_ND fp32 = Σ_k w_nk · SwiGLU_{e_nk}(x_n) for a few pairs: two GEMVs per pair on views of the stacked
    weights, one SwiGLU over all pairs, an fp32 weighted sum. Why: at decode sizes (one token per row) the
    plan, the sort and a grouped GEMM that visits every expert between the first and the last chosen one
    (CPU `_grouped_mm` runs one GEMM per group, empty ones too) cost more than the GEMVs themselves; a
    GEMV reads each chosen expert's weights once and copies nothing (gathering the chosen weights first
    was ~3x slower, V4 decode), and CPU bf16 GEMMs of a few rows are several times slower than GEMVs
    (tiny preset: 1-row bf16 GEMM 105 us vs GEMV 61 us per 256 KiB expert matrix, 2-core AMD, AVX2)."""
    N, K = ids_NK.shape
    I = W2.shape[-1]
    ids = ids_NK.reshape(-1).tolist()
    x_rows = x_ND.unbind(0)  # one call for all row views (not one indexing op per pair)
    h_PF = torch.stack([torch.mv(W1[e], x_rows[p // K]) for p, e in enumerate(ids)])
    _clamp(h_PF, I, limit)
    a_rows = F.silu(h_PF[:, :I], inplace=True).mul_(h_PF[:, I:]).unbind(0)
    y_PD = torch.stack([torch.mv(W2[e], a) for e, a in zip(ids, a_rows)])
    return torch.bmm(w_NK.unsqueeze(1), y_PD.view(N, K, -1).float()).squeeze(1)


@torch.no_grad()
def decode_grouped(x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor, W1: torch.Tensor,
                   W2: torch.Tensor, limit: float | None) -> torch.Tensor:
    """`decode_pairs` for a few dozen pairs (a batch of decoding rows): sort the pairs by expert, two
    `_grouped_mm` (each chosen expert's weights read once, its rows in one GEMM; the loop over experts is
    in C++), one fp32 weighted scatter-add; a dozen ops whatever the number of pairs, against four per
    pair (tiny preset, 48 pairs: 20% faster in fp32, 8% in bf16). Needs `gmm_supported` strides."""
    N, K = ids_NK.shape
    I = W2.shape[-1]
    flat_P = ids_NK.reshape(-1)
    order_P = flat_P.argsort(stable=True)
    offs_E = torch.bincount(flat_P, minlength=W1.shape[0]).cumsum(0).to(torch.int32)
    tok_P = order_P // K
    h_PF = torch._grouped_mm(x_ND.index_select(0, tok_P), W1.transpose(-2, -1), offs=offs_E)
    _clamp(h_PF, I, limit)
    a_PI = F.silu(h_PF[:, :I], inplace=True).mul_(h_PF[:, I:])
    y_PD = torch._grouped_mm(a_PI, W2.transpose(-2, -1), offs=offs_E).float()
    y_PD.mul_(w_NK.reshape(-1)[order_P, None])
    return torch.zeros((N, y_PD.shape[1]), dtype=torch.float32, device=x_ND.device).index_add_(0, tok_P, y_PD)


__all__ = ["CHUNK_BYTES", "DECODE_GEMV_PAIRS", "DECODE_MAX_PAIRS", "decode_grouped", "decode_pairs",
           "expert_pool", "parallel", "plan_chunks", "run_on_workers", "segment_chunks"]
