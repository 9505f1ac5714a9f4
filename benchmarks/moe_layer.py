"""MoE-layer benchmark: widemoe's MoE block vs the reference loop, a dense SwiGLU and transformers.

Not a test. One process, same weights and the same sequence of input batches (a fresh batch per call,
so routing changes every time, as in training) for every implementation, timed round-robin
(A B C ..., A B C ..., median of the repetitions after warm-up) so that ratios are measured at the same
moment on a shared, noisy machine (method of shared/reference/cpu-performance-detail.md §1).

Implementations per (config, T, dtype, mode):
- `widemoe`: `widemoe.model.moe.MoE` (router + sorted grouped dispatch + shared experts), impl="auto";
- `reference`: the same router and shared experts with `reference_moe`, the per-expert test oracle;
- `dense`: a SwiGLU of hidden width (k + n_shared)·I, the same useful FLOPs without routing (the ceiling);
- `hf_eager`, `hf_grouped_mm`, `hf_batched_mm`: transformers 5.24 `DeepseekV3MoE` with each experts
  implementation, loaded with widemoe's state_dict. Backends whose estimated cost exceeds the memory or
  time limit (batched_mm gathers one weight matrix per token-expert pair; eager's backward materialises a
  full-size zero gradient per expert) are skipped with the reason printed.

Modes: `fwd` under no_grad; `fwdbwd` = forward + backward of a fixed random gradient, x and all parameters
requiring grad. bf16 = pure bf16 weights and activations (router stays fp32).

Also: the "E=256 vs E=8 at equal active FLOPs" comparison (d=1024, k·I=2048).

Usage: python benchmarks/moe_layer.py [--quick] [--configs a,b] [--reps N]
Writes benchmarks/results/moe_layer.json.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from widemoe.config import ModelConfig
from widemoe.model.moe import MoE
from widemoe.runtime import configure_cpu_runtime

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracles import reference_moe  # noqa: E402  (the test oracle; tests/ is not a package)

RESULTS = Path(__file__).resolve().parent / "results" / "moe_layer.json"


def code_version() -> str:
    """The commit measured, with "+dirt" when the working tree differs from it."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


@dataclass(frozen=True)
class Shape:
    name: str
    d: int
    E: int
    k: int
    I: int
    shared: int

    @property
    def active(self) -> int:
        return (self.k + self.shared) * self.I

    def flops_per_token(self, mode: str) -> float:
        fwd = 2 * 3 * self.d * self.active
        return fwd if mode == "fwd" else 3 * fwd


CONFIGS = {
    "a": Shape("a: d512 E64 k8 I256 +1sh", 512, 64, 8, 256, 1),
    "b": Shape("b: d512 E128 k16 I128", 512, 128, 16, 128, 0),
    "c": Shape("c: d1024 E256 k8 I256", 1024, 256, 8, 256, 0),
}
# E=256 vs E=8 at equal active FLOPs (k·I = 2048), same d
GRANULARITY = {
    "fine": Shape("fine: d1024 E256 k8 I256", 1024, 256, 8, 256, 0),
    "coarse": Shape("coarse: d1024 E8 k2 I1024", 1024, 8, 2, 1024, 0),
}


def model_config(s: Shape) -> ModelConfig:
    # DeepSeek-V3 routing without group limit: sigmoid, selection bias, renormalised weights
    return ModelConfig(hidden_size=s.d, n_routed_experts=s.E, num_experts_per_tok=s.k,
                       moe_intermediate_size=s.I, n_shared_experts=s.shared, n_group=1, topk_group=1,
                       scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
                       routed_scaling_factor=1.0, num_attention_heads=8)


class DenseSwiGLU(torch.nn.Module):
    """The ceiling: one fused gate|up GEMM, silu·up, one down GEMM, hidden = active width."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(2 * hidden, d) * 0.02)
        self.w2 = torch.nn.Parameter(torch.randn(d, hidden) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = F.linear(x, self.w1).chunk(2, dim=-1)
        return F.linear(F.silu(g) * u, self.w2)


def build_hf(s: Shape, moe: MoE):  # noqa: ANN201
    try:
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf
    except Exception as e:  # noqa: BLE001 - transformers is a dev dependency
        print(f"  transformers unavailable ({e}); skipping HF backends")
        return None
    cfg = hf.DeepseekV3Config(hidden_size=s.d, moe_intermediate_size=s.I, n_routed_experts=s.E,
                              n_shared_experts=s.shared, num_experts_per_tok=s.k, n_group=1, topk_group=1,
                              routed_scaling_factor=1.0, norm_topk_prob=True)
    m = hf.DeepseekV3MoE(cfg)
    m.load_state_dict(moe.state_dict(), strict=s.shared > 0)  # without shared experts HF keeps empty ones
    return m


def hf_skip_reason(
    backend: str, s: Shape, T: int, dtype: torch.dtype, mode: str, time_limit: float
) -> str | None:
    esize = torch.empty(0, dtype=dtype).element_size()
    expert_bytes = 3 * s.d * s.I * esize  # one expert's gate, up and down
    if backend == "batched_mm":
        need = T * s.k * expert_bytes * (2 if mode == "fwdbwd" else 1)
        if need > 8e9:
            return f"gathers one expert weight per token-expert pair: ~{need / 1e9:.0f} GB > 8 GB"
    if backend == "eager" and mode == "fwdbwd":
        # each W[e] SelectBackward zero-fills a full [E, ...] gradient: E x all expert bytes per parameter;
        # measured ~2.5 GB/s effective on the project CPU (2.5 s for config a at T=2048)
        est = s.E * s.E * expert_bytes / 2.5e9
        if est > time_limit:
            return f"W[e] backward zero-fills E x full-size grads: ~{est:.0f} s per call > {time_limit:.0f} s"
    return None


def time_round_robin(fns: dict[str, Callable[[], None]], reps: int, warmup: int) -> dict[str, list[float]]:
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(reps):
        for n, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
    return times


def make_call(module: torch.nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], xs: list[torch.Tensor],
              gout: torch.Tensor, mode: str) -> Callable[[], None]:
    """Each call takes the next batch of `xs` (cycling): every implementation sees the same sequence."""
    params = [p for p in module.parameters() if p.requires_grad]
    step = [0]

    def call() -> None:
        x = xs[step[0] % len(xs)]
        step[0] += 1
        if mode == "fwd":
            with torch.no_grad():
                fn(x)
            return
        xx = x.detach().requires_grad_()
        fn(xx).backward(gout)
        for p in params:
            p.grad = None

    return call


def bench_case(s: Shape, T: int, dtype: torch.dtype, mode: str, reps: int, warmup: int, with_hf: bool,
               with_reference: bool, time_limit: float) -> dict:
    torch.manual_seed(0)
    moe = MoE(model_config(s), layer_idx=0)
    with torch.no_grad():
        moe.gate.weight.normal_(std=0.02)
    dense = DenseSwiGLU(s.d, s.active)
    hf = build_hf(s, moe) if with_hf else None
    moe.to(dtype)
    dense.to(dtype)
    # a fresh batch per call, as in training: new routing, hence new segment lengths every time (CPU bf16
    # GEMM kernels are built per shape, so a repeated batch would flatter every grouped implementation)
    xs = [torch.randn(1, T, s.d).to(dtype) for _ in range(warmup + reps)]
    gout = torch.randn(1, T, s.d).to(dtype)

    def ref_fn(xx: torch.Tensor) -> torch.Tensor:
        x_ND = xx.view(T, s.d)
        r = moe.gate(x_ND)
        y = reference_moe(x_ND, moe.experts.gate_up_proj, moe.experts.down_proj, r.topk_ids, r.topk_weights)
        if moe.shared_experts is not None:
            y = y + moe.shared_experts(x_ND)
        return y.view(1, T, s.d)

    fns = {"widemoe": make_call(moe, lambda xx: moe(xx)[0], xs, gout, mode),
           "dense": make_call(dense, dense, xs, gout, mode)}
    if with_reference:
        fns["reference"] = make_call(moe, ref_fn, xs, gout, mode)
    skipped: dict[str, str] = {}
    if hf is not None:
        hf.to(dtype)
        for backend in ("eager", "grouped_mm", "batched_mm"):
            why = hf_skip_reason(backend, s, T, dtype, mode, time_limit)
            if why:
                skipped[f"hf_{backend}"] = why
                continue

            def run_hf(xx: torch.Tensor, b: str = backend) -> torch.Tensor:
                hf.config._experts_implementation = b
                return hf(xx)

            fns[f"hf_{backend}"] = make_call(hf, run_hf, xs, gout, mode)
    times = time_round_robin(fns, reps, warmup)
    med = {n: statistics.median(v) for n, v in times.items()}
    res = {"config": s.name, "T": T, "dtype": str(dtype).removeprefix("torch."), "mode": mode,
           "tokens_per_s": {n: T / t for n, t in med.items()},
           "ms": {n: 1e3 * t for n, t in med.items()},
           "spread": {n: (min(v) / med[n], max(v) / med[n]) for n, v in times.items()},
           "useful_gflops": {n: T * s.flops_per_token(mode) / t / 1e9 for n, t in med.items()},
           "skipped": skipped}
    hf_best = [n for n in med if n.startswith("hf_")]
    res["ratio_vs_dense"] = med["dense"] / med["widemoe"]
    if hf_best:
        best = min(hf_best, key=lambda n: med[n])
        res["fastest_hf"] = best
        res["ratio_vs_fastest_hf"] = med[best] / med["widemoe"]
    return res


def print_case(r: dict) -> None:
    tps = r["tokens_per_s"]
    cells = "  ".join(f"{n}={v / 1e3:.1f}k" for n, v in tps.items())
    hf = f"  vs {r['fastest_hf']}: {r['ratio_vs_fastest_hf']:.2f}x" if "fastest_hf" in r else ""
    print(f"{r['config']:<26} T={r['T']:<5} {r['dtype']:<8} {r['mode']:<6} | {cells} | "
          f"widemoe/dense {r['ratio_vs_dense']:.2f}{hf}", flush=True)
    for n, why in r["skipped"].items():
        print(f"{'':<26} skipped {n}: {why}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T=2048 only, fewer repetitions (~2-4 min)")
    ap.add_argument("--configs", default="a,b,c", help="comma-separated subset of a,b,c (default all)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per implementation")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers backends")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in names if c not in CONFIGS]
    if bad:
        ap.error(f"--configs: unknown config(s) {bad}; choose from {sorted(CONFIGS)}")

    version = code_version()  # now: src/ may change while the benchmark runs, the imported code does not
    runtime = configure_cpu_runtime(num_threads=2)
    Ts = [2048] if args.quick else [2048, 8192]
    reps = args.reps or (3 if args.quick else 5)
    warmup = 1 if args.quick else 2
    time_limit = 4.0 if args.quick else 60.0
    print(f"torch {torch.__version__}, {runtime}, reps={reps} (median), warmup={warmup}, "
          f"{platform.machine()} {platform.processor() or ''}".rstrip(), flush=True)

    results = []
    t_start = time.perf_counter()
    for c in names:
        for T in Ts:
            for dtype in (torch.float32, torch.bfloat16):
                for mode in ("fwd", "fwdbwd"):
                    r = bench_case(CONFIGS[c], T, dtype, mode, reps, warmup, with_hf=not args.no_hf,
                                   with_reference=True, time_limit=time_limit)
                    print_case(r)
                    results.append(r)

    print("\nE=256 vs E=8 at equal active FLOPs (d=1024, k*I=2048)", flush=True)
    granularity = []
    for T in Ts:
        for dtype in (torch.float32, torch.bfloat16):
            for mode in ("fwd", "fwdbwd"):
                rs = {}
                for key, shape in GRANULARITY.items():
                    rs[key] = bench_case(shape, T, dtype, mode, reps, warmup, with_hf=False,
                                         with_reference=False, time_limit=time_limit)
                ratio = rs["fine"]["tokens_per_s"]["widemoe"] / rs["coarse"]["tokens_per_s"]["widemoe"]
                g = {"T": T, "dtype": str(dtype).removeprefix("torch."), "mode": mode,
                     "fine_tokens_per_s": rs["fine"]["tokens_per_s"]["widemoe"],
                     "coarse_tokens_per_s": rs["coarse"]["tokens_per_s"]["widemoe"],
                     "fine_over_coarse": ratio,
                     "fine_vs_dense": rs["fine"]["ratio_vs_dense"],
                     "coarse_vs_dense": rs["coarse"]["ratio_vs_dense"]}
                granularity.append(g)
                print(f"T={T:<5} {g['dtype']:<8} {mode:<6} E256 {g['fine_tokens_per_s'] / 1e3:.1f}k tok/s  "
                      f"E8 {g['coarse_tokens_per_s'] / 1e3:.1f}k tok/s  E256/E8 = {ratio:.2f}  "
                      f"(vs dense: {g['fine_vs_dense']:.2f} / {g['coarse_vs_dense']:.2f})", flush=True)

    print("\nSummary: widemoe / dense (targets: fwd >= 0.9, fwdbwd >= 0.8 on a, b); "
          "widemoe / fastest HF (target >= 1)")
    for r in results:
        hf = f"{r['ratio_vs_fastest_hf']:.2f}" if "ratio_vs_fastest_hf" in r else "-"
        print(f"  {r['config'][:1]} T={r['T']:<5} {r['dtype']:<8} {r['mode']:<6} "
              f"dense {r['ratio_vs_dense']:.2f}  hf {hf}")
    out = {"commit": version, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "torch": torch.__version__, "runtime": runtime, "quick": args.quick, "reps": reps,
           "warmup": warmup, "python": sys.version.split()[0], "seconds": time.perf_counter() - t_start,
           "results": results, "granularity": granularity}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=lambda o: None if isinstance(o, float) and
                                   not math.isfinite(o) else str(o)))
    print(f"\nwrote {args.out}  ({out['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
