"""`widemoe experiment SUITE`: train every run of a suite, interleaved seed by seed, resumable.

The output directory holds everything the report needs and nothing it has to guess:

    DIR/suite.toml             the suite file as run; resuming refuses a different one
    DIR/plan.json              suite name, quick or not, seeds, the run order, the git commit at the start
    DIR/runs/<run_id>/         each run's `widemoe train` directory (metrics.jsonl; checkpoints until the
                               run is recorded, then deleted unless keep_checkpoints)
    DIR/results/<run_id>.json  each finished run: arm, seed, configs, commit, metrics, curves (`record_run`)

A run is done when its result file exists (written atomically, last). Interrupted, the suite resumes
where it stopped: recorded runs are skipped, a run with a committed checkpoint continues from it (exact
resume, so the result equals an uninterrupted run's), and a run that left only a partial directory starts
over. Every run ends with the same held-out evaluation: the suite's `final_eval_batches` held-out batches
of every domain (default: all of them), more than the few that `eval_batches` takes during training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from widemoe.experiment.suite import Run, Suite, SuiteError, interleaved_runs, load_suite

Notify = Callable[[str], None]
SMOKE_LABEL = "smoke test, not evidence"  # every output of a --quick suite says so


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def git_commit() -> dict[str, Any]:
    """The commit of the widemoe source tree, and whether tracked files differ from it ("unknown": no git)."""
    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}
    return {"commit": head, "dirty": bool(dirty)}


def host_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


# --- one run -------------------------------------------------------------------------------------


def run_dir_of(out: Path, run: Run) -> Path:
    return out / "runs" / run.run_id


def result_path(out: Path, run: Run) -> Path:
    return out / "results" / f"{run.run_id}.json"


def train_run(suite: Suite, run: Run, out: Path, stop_at: int | None = None) -> dict[str, Any] | None:
    """Train one run (continuing from its newest checkpoint if it has one), evaluate it on the full
    held-out set and write its result file; returns the result, or None when `stop_at` stopped it early
    (a test of resuming)."""
    from widemoe.hf.resolve import latest_checkpoint
    from widemoe.train.run import run_training

    run_dir = run_dir_of(out, run)
    resume = latest_checkpoint(run_dir) is not None
    tc = suite.train_config(suite.arm(run.arm), run.seed, str(run_dir))
    tc = dataclasses.replace(tc, resume=resume, fresh=not resume and run_dir.exists(), stop_at=stop_at)
    t0 = time.perf_counter()
    result = run_training(tc, notify=lambda m: None)
    if result["steps"] < tc.steps:
        return None
    record = record_run(suite, run, result, time.perf_counter() - t0)
    path = result_path(out, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, separators=(",", ":")) + "\n")  # compact: suites' records get committed
    os.replace(tmp, path)  # a result file exists only complete
    return record


def record_run(suite: Suite, run: Run, result: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """The result record of a trained run: the full held-out evaluation plus what metrics.jsonl says."""
    from widemoe.data import heldout_batches
    from widemoe.experiment.metrics import run_metrics
    from widemoe.train.eval import evaluate_heldout
    from widemoe.train.metrics import read_metrics

    trainer, td = result["trainer"], result["data"]
    tc = trainer.tc
    full = heldout_batches(td.tokens, tc.batch_size, tc.seq_len, max_batches=suite.final_eval_batches)
    final = evaluate_heldout(trainer.model, full, tc.bf16, trainer.device)
    records = read_metrics(Path(tc.run_dir) / "metrics.jsonl")
    start = next((r for r in records if r.get("kind") == "start"), {})
    return {
        "run_id": run.run_id, "arm": run.arm, "seed": run.seed, "suite": suite.name, "quick": suite.is_quick,
        **git_commit(), "host": host_info(), "wall_seconds": wall_s,
        "model_config": trainer.config.to_dict(), "train_config": dataclasses.asdict(tc),
        "params": start.get("params"), "flops_per_token": start.get("flops_per_token"),
        "heldout_windows": {d: sum(len(b[0]) for b in bs) for d, bs in full.items()},
        **run_metrics(records, final, tc.steps),
    }


# --- the suite -----------------------------------------------------------------------------------


def _prepare_out(suite: Suite, out: Path, seeds: int | None, runs: list[Run]) -> None:
    """Write suite.toml and plan.json, or check that they describe this suite (resuming)."""
    text = Path(suite.path).read_text()
    plan = {"suite": suite.name, "quick": suite.is_quick, "seeds": seeds,
            "runs": [r.run_id for r in runs], **git_commit(), "started": time.time()}
    copy, plan_file = out / "suite.toml", out / "plan.json"
    if plan_file.exists():
        old = json.loads(plan_file.read_text())
        same = old.get("runs") == plan["runs"] and old.get("quick") == plan["quick"]
        if not same or copy.read_text() != text:
            raise SuiteError(
                f"{out} holds a suite run started with a different suite file, --quick or --seeds "
                f"({old.get('suite')!r}, quick={old.get('quick')}, seeds={old.get('seeds')}); "
                "give another --out, or delete the directory to start over"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    copy.write_text(text)
    plan_file.write_text(json.dumps(plan, indent=1) + "\n")


def _worker(suite_path: str, quick: bool, run: Run, out: str, threads: int) -> dict[str, Any] | None:
    """A run in a worker process (`jobs` > 1): its own torch threads."""
    from widemoe.runtime import configure_cpu_runtime

    configure_cpu_runtime(threads)
    suite = load_suite(suite_path)
    return train_run(suite.quick() if quick else suite, run, Path(out))


def run_suite(
    suite: Suite, out: str | Path, seeds: int | None = None, jobs: int = 1, threads: int = 1,
    keep_checkpoints: bool = False, notify: Notify = _to_stderr,
) -> list[dict[str, Any]]:
    """Train every run of `suite` not yet recorded in `out`, in the interleaved order (`jobs` at a time,
    each with `threads` torch threads); the result records of every run, in the run order."""
    out = Path(out)
    runs = interleaved_runs(suite, seeds)
    _prepare_out(suite, out, seeds, runs)
    todo = [r for r in runs if not result_path(out, r).is_file()]
    label = f" ({SMOKE_LABEL})" if suite.is_quick else ""
    notify(f"suite {suite.name}{label}: {len(runs)} runs, {len(runs) - len(todo)} already recorded, "
           f"{len(todo)} to train into {out}")
    progress = _Progress(suite, runs, todo, notify)

    def recorded(run: Run) -> None:  # the run's result file exists: its checkpoints are no longer needed
        if not keep_checkpoints:
            shutil.rmtree(run_dir_of(out, run) / "checkpoints", ignore_errors=True)
        progress.done(run, out)

    if jobs <= 1:
        for run in todo:
            train_run(suite, run, out)
            recorded(run)
    else:
        _run_parallel(suite, todo, out, jobs, threads, recorded)
    return [json.loads(result_path(out, r).read_text()) for r in runs]


def _run_parallel(suite: Suite, todo: list[Run], out: Path, jobs: int, threads: int,
                  recorded: Callable[[Run], None]) -> None:
    """`jobs` runs at a time in spawned processes, started in the interleaved order."""
    pending: dict[Future, Run] = {}
    queue = list(todo)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        while queue or pending:
            while queue and len(pending) < jobs:
                run = queue.pop(0)
                pending[pool.submit(_worker, suite.path, suite.is_quick, run, str(out), threads)] = run
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                run = pending.pop(f)
                f.result()  # a failed run stops the suite with its error
                recorded(run)


class _Progress:
    """One plain line per finished run: its key numbers and the estimated time left."""

    def __init__(self, suite: Suite, runs: list[Run], todo: list[Run], notify: Notify):
        self.suite, self.notify, self.t0 = suite, notify, time.time()
        self.steps = {r.run_id: suite.arm_steps(suite.arm(r.arm)) for r in runs}
        self.left = sum(self.steps[r.run_id] for r in todo)
        self.total_todo = self.left
        self.n, self.count = len(runs) - len(todo), len(runs)

    def done(self, run: Run, out: Path) -> None:
        rec = json.loads(result_path(out, run).read_text())
        self.n += 1
        self.left -= self.steps[run.run_id]
        elapsed = time.time() - self.t0
        done_steps = self.total_todo - self.left
        eta = elapsed / done_steps * self.left if done_steps else 0.0
        m = rec["metrics"]
        self.notify(f"[{self.n}/{self.count}] {run.run_id}: held-out loss {m['heldout_loss']:.4f}, "
                    f"{m['tokens_per_s']:.0f} tokens/s, {rec['wall_seconds']:.0f} s; "
                    f"elapsed {elapsed / 60:.1f} min, about {eta / 60:.1f} min left")


__all__ = ["SMOKE_LABEL", "git_commit", "record_run", "result_path", "run_dir_of", "run_suite", "train_run"]
