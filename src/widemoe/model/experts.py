"""Routed experts: stacked SwiGLU weights and the grouped expert compute on rows sorted by expert.

Weights use the transformers v5 layout: ``gate_up_proj [E, 2I, D]`` (rows 0:I gate, I:2I up) and
``down_proj [E, D, I]``. `RoutedExperts.forward` runs steps 2-4 of the MoE path (model/moe.py):
``dispatcher.plan`` -> ``dispatcher.dispatch`` -> grouped compute on ``(x_sorted, counts)`` ->
``dispatcher.combine``. The compute never sees token indices: it reads rows of ``x_sorted``
(`widemoe.model.dispatch.SortedRows`), cuts them into chunks by ``counts``, and hands its output rows to
the dispatcher's combine, so an all-to-all dispatcher plugs in without changing anything here. It takes
the sorted routing weights too (`TokenDispatcher.routing_weights`) because folding them into the
activations pays (below), as Megatron-Core's grouped MLP applies its permuted probabilities inside the
activation. Two executions, both hand-written `torch.autograd.Function`s composing the three steps:

- `_SegmentFn` (CPU default, backends "threads" / "loop"): the sorted rows are cut into contiguous chunks
  of equal rows (an expert straddling a cut is split there; its dW parts are summed), one per
  single-threaded worker thread ("threads", as many as torch's intra-op threads) or one chunk run inline
  ("loop"). Per chunk, on its worker: `x_sorted.take` (the local dispatcher's gather of these rows),
  `_grouped_mm` over the chunk's experts (a per-expert loop when strides are unaligned), SwiGLU, and
  `dispatcher.combine_rows` (fp32 weighting and scatter-add into a worker-private fp32 accumulator).
  fp32 folds the weights into the [rows, I] activations before the down GEMM ((w·a)W = w·(aW), I <= D
  reads less), other dtypes weight the fp32 outputs in the combine. The backward runs in the same
  workers with whole-chunk gathers / elementwise passes and `_grouped_mm` for dA and dX, one GEMM per
  expert for dW written straight into the [E, ...] grads, and the routing-weight gradient as
  <gy·W2_e, a> over [rows, I], so the expert outputs are never saved: per-expert elementwise ops cost a
  GIL hand-off each (vs per-expert ops everywhere: MoE block forward+backward, quiet machine, T=2048, 7
  round-robin reps: config a bf16 0.43 -> 0.49x of dense, b bf16 0.28 -> 0.38x, a/b fp32 +0-7%; tiny
  preset training step +6-8%).
- `_GroupedFn` (GPU default, backend "gmm"): whole sorted buffers through `torch._grouped_mm` (needs
  16-byte-aligned strides), the dispatcher's whole-buffer combine (un-permute gather + one fp32 batched
  GEMV).

- decoding (no autograd, local dispatch, at most `DECODE_MAX_PAIRS` token-expert pairs, impl "auto"):
  no dispatch plan; a few pairs run two GEMVs each on views of the stacked weights, a batch of rows
  one sort and two `_grouped_mm` (`expert_workers.decode_pairs` / `decode_grouped`).

Saved tensors are kept once, weight gradients are written straight into [E, ...] buffers, and autograd
never indexes a 3-D parameter as `W[e]` (each `SelectBackward` zero-fills a tensor the size of the whole
parameter: 40x slower backward at E=256, cpu-performance-detail §5). Experts that receive no tokens get
exactly-zero gradients. "autograd" (plain autograd through `_grouped_mm` and the combine) is kept as a
benchmark baseline. The CPU worker pool and the chunking live in `widemoe.model.expert_workers`.

Why "threads" on CPU (measured side by side, median of 3-7 round-robin reps, T=2048, 2 threads, on the
project's shared 2-core Xeon with AMX; see benchmarks/moe_layer.py):
- busy machine (load 5-8, the usual state here): "threads" vs `_grouped_mm`, config a fp32 forward 0.63x
  vs 0.27x of dense, forward+backward 0.65x vs 0.14x; config b bf16 forward+backward 0.35x vs 0.15x. Each
  small GEMM under 2-thread OpenMP waits at a barrier for a descheduled partner (2-thread 512x256 GEMMs:
  6 GFLOP/s, 1-thread: 20-30); single-threaded workers have no per-GEMM barrier.
- quiet machine (load ~2): fp32 within 5-10% of `_grouped_mm` (a fwd 0.72 vs 0.75, b fwd 0.64 vs 0.61,
  b fwd+bwd 0.65 vs 0.66), bf16 20-30% behind it (a fwd 0.35 vs 0.46). Set `impl="gmm"` on a dedicated
  machine running bf16. In bf16 the AMX GEMMs (~550 GFLOP/s per core) are so fast that the memory-bound
  gather / SwiGLU / fp32-combine passes dominate any unfused dispatch; hence the lazy ``x_sorted`` and
  the per-chunk combine on the workers.

CPU bf16/fp16: oneDNN runs these GEMMs and compiles a kernel per shape, and routing makes new segment
lengths every batch; segments are padded to a multiple of `RoutedExperts.row_quantum` rows (pad rows
carry weight 0) so that the kernels repeat (see `widemoe.model.dispatch.plan_dispatch`). Under autocast
the experts compute in the autocast dtype.

Shapes: N tokens, D hidden, I expert width, E experts, K experts per token, R sorted rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from widemoe.config import ModelConfig
from widemoe.model.dispatch import DispatchPlan, LocalDispatcher, SortedRows, TokenDispatcher, group_ends
from widemoe.model.expert_workers import (
    DECODE_GEMV_PAIRS,
    DECODE_MAX_PAIRS,
    decode_grouped,
    decode_pairs,
    plan_chunks,
    run_on_workers,
)

IMPLS = ("auto", "gmm", "loop", "threads", "autograd")
# CPU bf16/fp16 expert segments are padded to multiples of at most this many rows (see `row_quantum`)
ONEDNN_MAX_QUANTUM = 64
Jobs = list[tuple[int, int, int]]  # one chunk: (expert, first sorted row, rows)


# --------------------------------------------------------------------------------------------------
# Grouped GEMM helpers: `_grouped_mm` where its constraints hold, the same loop in Python elsewhere.


def gmm_supported(x: torch.Tensor, *dims: int) -> bool:
    """`_grouped_mm` needs every stride to be a multiple of 16 bytes, and a CUDA device of sm80+ for bf16."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if any((d * x.element_size()) % 16 for d in dims):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 8
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


def _clamp_(h_RF: torch.Tensor, I: int, limit: float | None) -> torch.Tensor:
    """DeepSeek-V4's SwiGLU clamp on the pre-activations, in place: gate <= limit, |up| <= limit."""
    if limit is not None:
        h_RF[:, :I].clamp_(max=limit)
        h_RF[:, I:].clamp_(min=-limit, max=limit)
    return h_RF


def _chunk_offs(jobs: Jobs, device: torch.device) -> tuple[int, int, torch.Tensor]:
    """A chunk's expert range [e0, e1) and its int32 `_grouped_mm` group ends, relative to its first row."""
    r0 = jobs[0][1]
    e0, e1 = jobs[0][0], jobs[-1][0] + 1
    ends = [0] * (e1 - e0)
    for e, s, n in jobs:
        ends[e - e0] = s + n - r0
    for i in range(1, len(ends)):  # empty experts inside the range: zero-length groups
        ends[i] = max(ends[i], ends[i - 1])
    return e0, e1, torch.tensor(ends, dtype=torch.int32, device=device)


def _mm_rows(a_RK: torch.Tensor, W: torch.Tensor, jobs: Jobs, transpose: bool, use_gmm: bool) -> torch.Tensor:
    """A chunk's rows times their expert's W (or Wᵀ): `_grouped_mm` or a per-expert loop."""
    if use_gmm:
        e0, e1, offs = _chunk_offs(jobs, a_RK.device)
        We = W[e0:e1].transpose(-2, -1) if transpose else W[e0:e1]
        return torch._grouped_mm(a_RK, We, offs=offs)
    r0 = jobs[0][1]
    out = a_RK.new_empty(a_RK.shape[0], W.shape[-2] if transpose else W.shape[-1])
    for e, s, n in jobs:
        torch.mm(a_RK[s - r0:s - r0 + n], W[e].t() if transpose else W[e], out=out[s - r0:s - r0 + n])
    return out


def _swiglu_backward(da_RI: torch.Tensor, h_RF: torch.Tensor, dh_RF: torch.Tensor, I: int,
                     limit: float | None = None, silu_g: torch.Tensor | None = None) -> None:
    """dh = d[silu(g) * u]: d up = da · silu(g); d gate = silu'(g) · da · u (ATen's fused silu_backward,
    few passes matter in bf16). Overwrites da; `silu_g`: silu(g) if the caller has it already. With the V4
    clamp, h holds the clamped values and the gradient stops where the clamp was active (values at the
    limit)."""
    g, u = h_RF[:, :I], h_RF[:, I:]
    torch.mul(da_RI, F.silu(g) if silu_g is None else silu_g, out=dh_RF[:, I:])
    torch.ops.aten.silu_backward.grad_input(da_RI.mul_(u), g, grad_input=dh_RF[:, :I])
    if limit is not None:
        dh_RF[:, :I].masked_fill_(g >= limit, 0)
        dh_RF[:, I:].masked_fill_(u.abs() >= limit, 0)


# --------------------------------------------------------------------------------------------------
# Chunked execution (CPU): dispatch.take -> compute -> dispatcher.combine_rows, per chunk on the workers


@dataclass
class _Segments:
    """One chunked execution: the dispatcher's rows and plan, the chunks cut from the counts, the weights."""

    x_sorted: SortedRows
    plan: DispatchPlan  # opaque to the compute: handed back to the dispatcher
    dispatcher: TokenDispatcher
    chunks: list[Jobs]
    w_R: torch.Tensor  # fp32 routing weight per sorted row
    limit: float | None
    workers: int

    @staticmethod
    def cut(x_sorted: SortedRows, counts: list[int], plan: DispatchPlan, dispatcher: TokenDispatcher,
            W1: torch.Tensor, W2: torch.Tensor, w_R: torch.Tensor, limit: float | None,
            workers: int) -> _Segments:
        chunks = plan_chunks(counts, workers, max(W2.shape[1], W1.shape[1]), x_sorted.src.element_size(),
                             quantum=plan.quantum)
        return _Segments(x_sorted, plan, dispatcher, chunks, w_R, limit, workers)

    def bounds(self, c: int) -> tuple[int, int]:
        jobs = self.chunks[c]
        return jobs[0][1], jobs[-1][1] + jobs[-1][2]

    def forward(self, x_ND: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor,
                save: bool) -> tuple[torch.Tensor, list[torch.Tensor | None] | None]:
        """y_ND (x's dtype) and, with `save`, each chunk's pre-activations h [rows, 2I]."""
        I = W2.shape[-1]
        use_gmm = x_ND.device.type == "cpu" and gmm_supported(x_ND, W1.shape[-1], I)
        h_chunks: list[torch.Tensor | None] = [None] * len(self.chunks)
        fold_w = x_ND.dtype == torch.float32 and I <= W2.shape[1]  # see the module docstring
        d = self.dispatcher

        def run(c: int, acc: torch.Tensor) -> None:
            jobs = self.chunks[c]
            r0, r1 = self.bounds(c)
            xs = self.x_sorted.take(r0, r1)  # dispatch (local: the gather of these rows)
            h = _clamp_(_mm_rows(xs, W1, jobs, transpose=True, use_gmm=use_gmm), I, self.limit)
            a = F.silu(h[:, :I]) * h[:, I:] if save else F.silu(h[:, :I], inplace=True).mul_(h[:, I:])
            w = self.w_R[r0:r1, None]
            if fold_w:
                a.mul_(w)
            ys = _mm_rows(a, W2, jobs, transpose=True, use_gmm=use_gmm)
            if save:
                h_chunks[c] = h
            d.combine_rows(acc, self.plan, r0, r1, ys, None if fold_w else w)  # combine (fp32)

        accs = run_on_workers(run, len(self.chunks), self.workers, lambda: d.new_accumulator(x_ND, self.plan))
        return d.combine_finish(accs, self.plan).to(x_ND.dtype), (h_chunks if save else None)


@dataclass
class _SegmentGrads:
    """The backward of one `_Segments` forward: per chunk, on the workers (see `_SegmentFn`)."""

    seg: _Segments
    gy_sorted: SortedRows
    W1: torch.Tensor
    W2: torch.Tensor
    h_chunks: list[torch.Tensor]
    d_W1: torch.Tensor | None
    d_W2: torch.Tensor | None
    gw_R: torch.Tensor | None
    firsts: dict[int, int]  # chunk -> its first expert, when that expert began in the previous chunk
    part_W1: dict[int, torch.Tensor]
    part_W2: dict[int, torch.Tensor]
    use_gmm: bool

    def __call__(self, c: int, dx: torch.Tensor | None) -> None:
        # whole-chunk gathers and elementwise passes (few Python ops: the GIL is handed between the
        # workers once per op); per-expert GEMMs only where dW is written straight into [E, ...]
        seg, jobs, h = self.seg, self.seg.chunks[c], self.h_chunks[c]
        r0, r1 = seg.bounds(c)
        I, dtype = self.W2.shape[-1], h.dtype
        sg = F.silu(h[:, :I])
        a = sg * h[:, I:]
        gys = self.gy_sorted.take(r0, r1)  # unweighted d y of these rows (the combine's adjoint)
        da = _mm_rows(gys, self.W2, jobs, transpose=False, use_gmm=self.use_gmm)  # gy·W2_e: <da, a> = d w
        if self.gw_R is not None:
            fp32 = dtype == torch.float32
            self.gw_R[r0:r1] = (da * a).sum(-1) if fp32 else (da.float() * a.float()).sum(-1)
        wd = seg.w_R[r0:r1, None].to(dtype)
        if self.d_W2 is not None:
            a.mul_(wd)
            self._weight_grads(c, gys, a, self.d_W2, self.part_W2)  # Σ (w·gy)ᵀ a
        dh = torch.empty_like(h)
        _swiglu_backward(da.mul_(wd), h, dh, I, seg.limit, silu_g=sg)
        del da, a, sg
        if self.d_W1 is not None:
            self._weight_grads(c, dh, seg.x_sorted.take(r0, r1), self.d_W1, self.part_W1)
        if dx is not None:
            dxs = _mm_rows(dh, self.W1, jobs, transpose=False, use_gmm=self.use_gmm)
            seg.dispatcher.combine_rows(dx, seg.plan, r0, r1, dxs, None)  # the dispatch's adjoint

    def _weight_grads(self, c: int, g_RO: torch.Tensor, a_RI: torch.Tensor, d_W: torch.Tensor,
                      parts: dict[int, torch.Tensor]) -> None:
        """dW_e = g_eᵀ a_e per expert of chunk c, straight into d_W[e] (a split expert's later part into
        `parts`, summed after the workers finish)."""
        r0 = self.seg.chunks[c][0][1]
        for e, s, n in self.seg.chunks[c]:
            split = self.firsts.get(c) == e and s == r0
            torch.mm(g_RO[s - r0:s - r0 + n].t(), a_RI[s - r0:s - r0 + n], out=parts[c] if split else d_W[e])


class _SegmentFn(torch.autograd.Function):
    """Chunked expert-parallel path (CPU): each worker thread takes its chunk's rows, runs its experts
    and combines into a private fp32 accumulator; the dispatcher sums the accumulators.

    Saved: x, the sorted weights and the pre-activations h [R, 2I]; the backward re-takes the x rows per
    chunk, recomputes a = silu(g)·u, and gets the routing-weight gradient as <gy·W2_e, a> without keeping
    the expert outputs.
    """

    @staticmethod
    def forward(ctx, x_ND, W1, W2, w_NK, seg: _Segments):  # noqa: ANN001, ANN205
        y, h_chunks = seg.forward(x_ND, W1, W2, save=True)
        ctx.save_for_backward(x_ND, W1, W2, *h_chunks)
        ctx.seg, ctx.wshape = seg, w_NK.shape
        return y

    @staticmethod
    def backward(ctx, gy_ND):  # noqa: ANN001, ANN205
        x_ND, W1, W2, *h_chunks = ctx.saved_tensors
        seg: _Segments = ctx.seg
        need_x, need_w1, need_w2, need_w = ctx.needs_input_grad[:4]
        gy_sorted, counts = seg.dispatcher.dispatch(gy_ND.contiguous().to(x_ND.dtype), seg.plan)
        d_W1 = _expert_grad_buffer(W1, counts) if need_w1 else None
        d_W2 = _expert_grad_buffer(W2, counts) if need_w2 else None
        # an expert split between two chunks: the later chunk writes its dW part privately, summed below
        ch = seg.chunks
        firsts = {c: ch[c][0][0] for c in range(1, len(ch)) if ch[c - 1][-1][0] == ch[c][0][0]}
        grads = _SegmentGrads(
            seg, gy_sorted, W1, W2, h_chunks, d_W1, d_W2, torch.empty_like(seg.w_R) if need_w else None,
            firsts, {c: torch.empty_like(W1[e]) for c, e in firsts.items()} if need_w1 else {},
            {c: torch.empty_like(W2[e]) for c, e in firsts.items()} if need_w2 else {},
            use_gmm=x_ND.device.type == "cpu" and gmm_supported(x_ND, W1.shape[-1], W2.shape[-1]))
        new_acc = (lambda: seg.dispatcher.new_accumulator(x_ND, seg.plan)) if need_x else None
        dx_accs = run_on_workers(grads, len(ch), seg.workers, new_acc)
        for c, e in firsts.items():
            if need_w1:
                d_W1[e] += grads.part_W1[c]
            if need_w2:
                d_W2[e] += grads.part_W2[c]
        dx = seg.dispatcher.combine_finish(dx_accs, seg.plan).to(x_ND.dtype) if need_x else None
        gw_NK = seg.dispatcher.weight_grads(grads.gw_R, seg.plan, ctx.wshape) if need_w else None
        return dx, d_W1, d_W2, gw_NK, None


def _expert_grad_buffer(W: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """An uninitialised [E, ...] gradient whose experts without rows are exactly zero (the others are
    written whole by their GEMMs)."""
    g = torch.empty_like(W)
    for e, n in enumerate(counts):
        if n == 0:
            g[e].zero_()
    return g


# --------------------------------------------------------------------------------------------------
# Whole-buffer execution (GPU; CPU when forced): materialised x_sorted, grouped GEMMs, whole combine


class _GroupedFn(torch.autograd.Function):
    """y = Σ_k w_k · SwiGLU_{e_k}(x) over whole sorted buffers with `torch._grouped_mm` (GPU path; on CPU
    when forced): one gather, grouped GEMMs, one fp32 combine; hand-written backward.

    Saved once: the sorted rows [R, D], the pre-activations [R, 2I] and activations [R, I], and the
    token-ordered expert outputs (fp32, for the routing-weight gradient). The backward writes dW straight
    into [E, ...] gradients and never builds autograd's copies for chunk / silu / mul / index_add.
    """

    @staticmethod
    def forward(ctx, x_ND, W1, W2, w_NK, x_sorted: SortedRows, counts: list[int],  # noqa: ANN001, ANN205
                plan: DispatchPlan, dispatcher: TokenDispatcher, limit=None):  # noqa: ANN001
        I, offs = W2.shape[-1], group_ends(counts, x_ND.device)
        xs_RD = x_sorted.full()
        h_RF = _clamp_(torch._grouped_mm(xs_RD, W1.transpose(-2, -1), offs=offs), I, limit)
        a_RI = F.silu(h_RF[:, :I]) * h_RF[:, I:]
        ys_RD = torch._grouped_mm(a_RI, W2.transpose(-2, -1), offs=offs)
        y_ND, ys_NKD = dispatcher.combine(ys_RD, w_NK, plan, keep_rows=True)
        ctx.save_for_backward(W1, W2, w_NK, xs_RD, h_RF, a_RI, ys_NKD)
        ctx.plan, ctx.dispatcher, ctx.offs, ctx.limit = plan, dispatcher, offs, limit
        return y_ND.to(x_ND.dtype)

    @staticmethod
    def backward(ctx, gy_ND):  # noqa: ANN001, ANN205
        W1, W2, w_NK, xs_RD, h_RF, a_RI, ys_NKD = ctx.saved_tensors
        plan, d, offs = ctx.plan, ctx.dispatcher, ctx.offs
        I, dtype = W2.shape[-1], xs_RD.dtype
        need_x, need_w1, need_w2, need_w = ctx.needs_input_grad[:4]
        gy_ND = gy_ND.contiguous()
        # d w_nk = <gy_n, ys_nk>
        gw_NK = torch.bmm(ys_NKD, gy_ND.float().unsqueeze(-1)).squeeze(-1) if need_w else None
        del ys_NKD
        w_R = d.routing_weights(w_NK, plan).to(dtype)
        gys_RD = d.dispatch(gy_ND.to(dtype), plan)[0].full() * w_R.unsqueeze(-1)  # d ys = w · gy[token]
        d_W2 = torch._grouped_mm(gys_RD.t(), a_RI, offs=offs) if need_w2 else None
        da_RI = torch._grouped_mm(gys_RD, W2, offs=offs)
        del gys_RD
        dh_RF = torch.empty_like(h_RF)
        _swiglu_backward(da_RI, h_RF, dh_RF, I, ctx.limit)
        del da_RI
        d_W1 = torch._grouped_mm(dh_RF.t(), xs_RD, offs=offs) if need_w1 else None
        dx_ND = None
        if need_x:
            dx_ND = d.combine(torch._grouped_mm(dh_RF, W1, offs=offs), None, plan)[0].to(dtype)
        return dx_ND, d_W1, d_W2, gw_NK, None, None, None, None, None


@torch.no_grad()
def _grouped_nograd(x_sorted: SortedRows, counts: list[int], W1: torch.Tensor, W2: torch.Tensor,
                    w_NK: torch.Tensor, plan: DispatchPlan, dispatcher: TokenDispatcher,
                    limit: float | None = None) -> torch.Tensor:
    I, offs = W2.shape[-1], group_ends(counts, W1.device)
    h_RF = _clamp_(torch._grouped_mm(x_sorted.full(), W1.transpose(-2, -1), offs=offs), I, limit)
    a_RI = F.silu(h_RF[:, :I], inplace=True).mul_(h_RF[:, I:])  # in place: no extra [R, I] buffers
    ys_RD = torch._grouped_mm(a_RI, W2.transpose(-2, -1), offs=offs)
    del h_RF, a_RI
    return dispatcher.combine(ys_RD, w_NK, plan)[0]


def _autograd_experts(x_sorted: SortedRows, counts: list[int], gate_up_EFD: torch.Tensor,
                      down_EDI: torch.Tensor, w_NK: torch.Tensor, plan: DispatchPlan,
                      dispatcher: TokenDispatcher, limit: float | None = None) -> torch.Tensor:
    """The plain recipe under autograd (gather, two `_grouped_mm`, fp32 combine): benchmark baseline."""
    inter, offs = down_EDI.shape[-1], group_ends(counts, down_EDI.device)
    h_RF = torch._grouped_mm(x_sorted.full(), gate_up_EFD.transpose(-2, -1), offs=offs)
    g, u = h_RF[:, :inter], h_RF[:, inter:]
    if limit is not None:  # out of place: autograd's clamp gradient
        g, u = g.clamp(max=limit), u.clamp(min=-limit, max=limit)
    ys_RD = torch._grouped_mm(F.silu(g) * u, down_EDI.transpose(-2, -1), offs=offs)
    return dispatcher.combine(ys_RD, w_NK, plan)[0]


# --------------------------------------------------------------------------------------------------
# The module


class RoutedExperts(nn.Module):
    """E stacked SwiGLU experts. `forward` = dispatch -> grouped compute -> combine; returns
    (y_ND, dropped_pairs). `impl` (one of IMPLS) forces an execution; "auto" chooses (`backend_for`)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        E, D, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.num_experts, self.hidden_size, self.intermediate_size = E, D, I
        self.initializer_range = config.initializer_range
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.impl = "auto"  # one of IMPLS; tests and benchmarks force a path
        self.swiglu_limit = config.swiglu_limit  # DeepSeek-V4 clamp (None: plain SwiGLU), every path
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate_up_proj, std=self.initializer_range)
        nn.init.normal_(self.down_proj, std=self.initializer_range)

    def row_quantum(self, x_ND: torch.Tensor, pairs: int) -> int:
        """Rows each expert segment is padded to a multiple of (see `plan_dispatch`): where oneDNN runs the
        GEMMs (CPU bf16 and fp16; it compiles a kernel per shape) a power of two near 1/8 of the mean
        segment, 8 to 64 rows: ~6% padding, and ~12 lengths per GEMM kind to compile once; else 1."""
        if not (x_ND.device.type == "cpu" and x_ND.dtype in (torch.bfloat16, torch.float16)):
            return 1
        mean = pairs / self.num_experts
        return min(ONEDNN_MAX_QUANTUM, max(8, 1 << max(0, int(math.log2(max(mean, 1) / 8)))))

    def backend_for(self, x_ND: torch.Tensor, grad: bool = True) -> str:
        """The path `impl="auto"` takes (see the module docstring for the measurements behind it)."""
        aligned = gmm_supported(x_ND, self.hidden_size, self.intermediate_size)
        if self.impl == "auto":
            if x_ND.device.type == "cpu":
                if not grad and x_ND.dtype == torch.bfloat16 and aligned and torch.get_num_threads() > 1:
                    # bf16 inference: the whole-buffer grouped GEMM measured 11-17% faster than the expert
                    # threads on configs a, b, c of benchmarks/moe_layer.py (quiet 2-core machine).
                    return "gmm"
                return "threads" if torch.get_num_threads() > 1 else "loop"
            return "gmm" if aligned else "loop"
        if self.impl in ("gmm", "autograd") and not aligned:
            return "loop"
        return self.impl

    def _compute_weights(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The expert weights in the dtype the experts compute in.

        Under autocast the experts compute in the autocast dtype, as autocast's own matmuls do (it does
        not reach into the custom Functions, so the cast is here; autograd casts the weight gradients
        back). With the segments padded for oneDNN (`row_quantum`) this made the tiny preset's
        bf16-autocast training step 18% faster than fp32 experts (938 -> 770 ms, 2-core CPU, same
        process); unpadded, the per-shape kernel builds made it 48% slower."""
        W1, W2 = self.gate_up_proj, self.down_proj
        if hasattr(W1, "to_local"):  # expert parallelism: a DTensor sharded over experts, this rank's slice
            W1, W2 = W1.to_local(), W2.to_local()
        dev = x_ND.device.type
        if torch.is_autocast_enabled(dev) and W1.dtype == torch.float32:
            dt = torch.get_autocast_dtype(dev)
            if dt != torch.float32:
                W1, W2 = W1.to(dt), W2.to(dt)
        return W1, W2

    def forward(self, x_ND: torch.Tensor, topk_ids_NK: torch.Tensor, topk_weights_NK: torch.Tensor,
                capacity: int | None = None, dispatcher: TokenDispatcher | None = None,
                ) -> tuple[torch.Tensor, int]:
        """Steps 2-4 of the MoE path: plan and dispatch (`dispatcher`, default: local), grouped compute on
        (x_sorted, counts), fp32 combine. Returns (y_ND in x's dtype, pairs dropped by `capacity`)."""
        if self.impl not in IMPLS:
            raise ValueError(f"RoutedExperts.impl={self.impl!r} must be one of {IMPLS}")
        d = dispatcher if dispatcher is not None else LocalDispatcher(self.num_experts)
        w_NK = topk_weights_NK.float()
        W1, W2 = self._compute_weights(x_ND)
        x_ND = x_ND.to(W1.dtype)
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x_ND, w_NK, W1, W2))
        pairs = topk_ids_NK.numel()
        if (not grad and capacity is None and isinstance(d, LocalDispatcher) and self.impl == "auto"
                and 0 < pairs <= DECODE_MAX_PAIRS):
            aligned = gmm_supported(x_ND, self.hidden_size, self.intermediate_size)
            fn = decode_grouped if pairs > DECODE_GEMV_PAIRS and aligned else decode_pairs
            return fn(x_ND, topk_ids_NK, w_NK, W1, W2, self.swiglu_limit).to(x_ND.dtype), 0
        plan = d.plan(topk_ids_NK, capacity, pad_to=self.row_quantum(x_ND, topk_ids_NK.numel()))
        x_sorted, counts = d.dispatch(x_ND, plan)  # local: a lazy gather, taken per chunk by the compute
        if x_sorted.num_rows == 0 and not d.collective:  # N = 0 or all dropped: zeros, graph kept connected
            zero = ((W1.sum() + W2.sum()) * 0).to(x_ND.dtype) + (w_NK.sum() * 0).to(x_ND.dtype)
            return x_ND * 0 + zero, plan.dropped
        backend, lim = self.backend_for(x_ND, grad), self.swiglu_limit
        if backend == "autograd" and grad and d.collective:
            raise ValueError("RoutedExperts.impl='autograd' cannot differentiate through an all-to-all "
                             "dispatcher; use 'auto', 'gmm', 'loop' or 'threads'")
        # grouped compute -> d.combine (whole buffers), or -> d.combine_rows per chunk on the workers
        if backend in ("gmm", "autograd") and not grad:
            y = _grouped_nograd(x_sorted, counts, W1, W2, w_NK, plan, d, lim)
        elif backend == "autograd":
            y = _autograd_experts(x_sorted, counts, W1, W2, w_NK, plan, d, lim)
        elif backend == "gmm":
            return _GroupedFn.apply(x_ND, W1, W2, w_NK, x_sorted, counts, plan, d, lim), plan.dropped
        else:
            workers = torch.get_num_threads() if backend == "threads" else 1
            w_R = d.routing_weights(w_NK, plan)
            seg = _Segments.cut(x_sorted, counts, plan, d, W1, W2, w_R, lim, workers)
            if grad:
                return _SegmentFn.apply(x_ND, W1, W2, w_NK, seg), plan.dropped
            # not through apply: ctx.needs_input_grad is True under no_grad, we must not save
            return seg.forward(x_ND, W1, W2, save=False)[0], plan.dropped
        return y.to(x_ND.dtype), plan.dropped

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, D={self.hidden_size}, I={self.intermediate_size}, impl={self.impl}"


__all__ = ["IMPLS", "RoutedExperts", "gmm_supported"]
