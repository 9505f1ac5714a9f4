"""Before/after speed check of a refactoring: this checkout's widemoe against an older one, in one process.

Not a test. The older code comes from a git worktree (``git worktree add /tmp/old <commit>``): its
``src/widemoe`` is copied to a temporary folder as the package ``widemoe_old`` (imports rewritten), so
both versions are imported side by side. Every setting builds both implementations with the same weights,
feeds them the same sequence of inputs (a fresh batch per call for the MoE layer, so routing changes every
time as in training) and times them round-robin (old, new, old, new, ...), so that each ratio is measured
at the same moment on a shared, noisy machine (method of shared/reference/cpu-performance-detail.md §1).

Settings, as in benchmarks/moe_layer.py and benchmarks/train_step.py:
- MoE layer: configs a, b, c; T=2048 (and 8192 with --tokens 2048,8192); fp32 and bf16; forward
  (no_grad) and forward+backward;
- training step: the `tiny` preset without MTP, batch 16 x 256, fused AdamW, fp32 and bf16 autocast.

    .venv/bin/python benchmarks/ab_refactor.py --old /tmp/old [--reps 7] [--only moe|train]
        [--tokens 2048,8192]

Prints old ms, new ms and new/old per setting and writes benchmarks/results/ab_refactor.json.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layer import CONFIGS, Shape, model_config  # noqa: E402  (benchmarks/ is not a package)
from train_step import step_fn  # noqa: E402
from widemoe.runtime import configure_cpu_runtime  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "ab_refactor.json"


def import_old(worktree: Path, tmp: Path) -> str:
    """Copy ``worktree/src/widemoe`` to ``tmp/widemoe_old`` with its imports renamed; return the name."""
    src = worktree / "src" / "widemoe"
    if not (src / "__init__.py").is_file():
        raise SystemExit(f"error: {worktree} has no src/widemoe/__init__.py (give a widemoe worktree)")
    dst = tmp / "widemoe_old"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    pat = re.compile(r"\bwidemoe(?=[.\s])")
    for p in dst.rglob("*.py"):
        p.write_text(pat.sub("widemoe_old", p.read_text()))
    sys.path.insert(0, str(tmp))
    return "widemoe_old"


def find(pkg: str, *candidates: str) -> Callable:
    """The first of ``module:attr`` candidates that exists in ``pkg`` (names moved by the refactoring)."""
    for c in candidates:
        mod, attr = c.split(":")
        try:
            m: ModuleType = importlib.import_module(f"{pkg}.{mod}")
        except ModuleNotFoundError:
            continue
        if hasattr(m, attr):
            return getattr(m, attr)
    raise SystemExit(f"error: none of {candidates} found in {pkg}")


def round_robin(fns: dict[str, Callable[[], float]], reps: int, warmup: int) -> dict[str, list[float]]:
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for i in range(reps):  # ABBA: neither side always runs right after the other's allocations
        for n in names if i % 2 == 0 else names[::-1]:
            times[n].append(fns[n]())
    return times


def moe_call(moe: torch.nn.Module, xs: list[torch.Tensor], gout: torch.Tensor,
             mode: str) -> Callable[[], float]:
    params = [p for p in moe.parameters() if p.requires_grad]
    step = [0]

    def call() -> float:
        x = xs[step[0] % len(xs)]
        step[0] += 1
        t0 = time.perf_counter()
        if mode == "fwd":
            with torch.no_grad():
                moe(x)
        else:
            moe(x.detach().requires_grad_())[0].backward(gout)
            for p in params:
                p.grad = None
        return time.perf_counter() - t0

    return call


def bench_moe(pkgs: dict[str, str], s: Shape, T: int, dtype: torch.dtype, mode: str, reps: int,
              warmup: int) -> dict[str, list[float]]:
    mods = {}
    for name, pkg in pkgs.items():
        cfg_cls = find(pkg, "config:ModelConfig")
        moe_cls = find(pkg, "model.moe:MoE")
        torch.manual_seed(0)
        moe = moe_cls(cfg_cls(**model_config(s).__dict__), layer_idx=0)
        mods[name] = moe
    ref = next(iter(mods.values()))
    with torch.no_grad():
        ref.gate.weight.normal_(std=0.02)
    state = ref.state_dict()
    for m in mods.values():
        m.load_state_dict(state)
        m.to(dtype)
    xs = [torch.randn(1, T, s.d).to(dtype) for _ in range(warmup + reps)]
    gout = torch.randn(1, T, s.d).to(dtype)
    return round_robin({n: moe_call(m, xs, gout, mode) for n, m in mods.items()}, reps, warmup)


def bench_train(pkgs: dict[str, str], bf16: bool, reps: int, batch: int = 16, seq: int = 256) -> dict:
    steppers = {}
    x = y = None
    for name, pkg in pkgs.items():
        preset = find(pkg, "presets:get_preset", "config:get_preset")
        build = find(pkg, "model.transformer:build_model", "model.causal_lm:build_model", "model:build_model")
        cfg = preset("tiny", num_nextn_predict_layers=0)
        if x is None:
            torch.manual_seed(0)
            ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
            x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
        model = build(cfg, seed=0)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        steppers[name] = step_fn(model, opt, x, y, bf16, hf=False)  # train_step.py's timed step
    return round_robin(steppers, reps, warmup=1)


def report(rows: list[dict], label: str, times: dict[str, list[float]]) -> None:
    med = {n: statistics.median(v) for n, v in times.items()}
    ratio = statistics.median(n / o for n, o in zip(times["new"], times["old"]))
    rows.append({"setting": label, "old_ms": 1e3 * med["old"], "new_ms": 1e3 * med["new"],
                 "new_over_old": ratio, "old_all_ms": [1e3 * t for t in times["old"]],
                 "new_all_ms": [1e3 * t for t in times["new"]]})
    print(f"{label:<44} old {1e3 * med['old']:8.1f} ms  new {1e3 * med['new']:8.1f} ms  new/old {ratio:5.3f}",
          flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", type=Path, required=True, help="a git worktree of the older widemoe")
    ap.add_argument("--reps", type=int, default=7, help="timed repetitions per implementation")
    ap.add_argument("--only", choices=("moe", "train"), default=None)
    ap.add_argument("--configs", default="a,b,c")
    ap.add_argument("--tokens", default="2048", help="comma-separated T values for the MoE layer")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    configure_cpu_runtime()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        pkgs = {"old": import_old(args.old, Path(tmp)), "new": "widemoe"}
        if args.only in (None, "moe"):
            for T in (int(t) for t in args.tokens.split(",")):
                for c in args.configs.split(","):
                    for dtype in (torch.float32, torch.bfloat16):
                        for mode in ("fwd", "fwdbwd"):
                            label = f"moe {c} T={T} {str(dtype)[6:]} {mode}"
                            report(rows, label, bench_moe(pkgs, CONFIGS[c], T, dtype, mode, args.reps, 2))
        if args.only in (None, "train"):
            for bf16 in (False, True):
                label = f"train step tiny 16x256 {'bf16 autocast' if bf16 else 'fp32'}"
                report(rows, label, bench_train(pkgs, bf16, args.reps))
    worst = max(r["new_over_old"] for r in rows)
    print(f"worst new/old: {worst:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "reps": args.reps, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
