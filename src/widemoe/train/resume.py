"""What `--resume` decides, stated to the user: which fields of the new invocation may differ from the
run's (`config_changes`), how a changed hyperparameter takes effect (`apply_changes`), and the checks
that would otherwise train nothing (`check_resume_steps`).

Decisions. The fields in `FIXED` define the model or the data stream (the checkpoint's weights and the
data cursor only fit the same ones): a change is refused, naming the flag, both values and the way out.
Every other changed field replaces the run's value from the resumed step on, each stated in one line
("--lr 0.5 replaces 0.003 from here"). `PER_INVOCATION` fields (where to stop, whether to resume, the
progress display) are not part of the run and are never compared.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from widemoe.train.config import TrainConfig
from widemoe.train.run_dir import RunDirError

FIXED = ("preset", "config_file", "model_overrides", "vocab_size", "seq_len", "batch_size", "seed", "balance")
PER_INVOCATION = ("run_dir", "stop_at", "resume", "fresh", "progress")
# Fields whose change must be written into the restored optimizer / schedule (they restore the old ones).
_OPTIMIZER_FIELDS = {"lr", "weight_decay", "betas", "steps", "warmup_steps", "min_lr_ratio"}

Change = tuple[str, Any, Any]  # (field, the run's value, the new value)


def flag(name: str) -> str:
    """The command-line flag of a `TrainConfig` field."""
    return "--config" if name == "config_file" else "--" + name.replace("_", "-")


def config_changes(saved: dict[str, Any], tc: TrainConfig, where: str) -> list[Change]:
    """The fields `tc` changes against the run's saved `TrainConfig` (`saved`, as recorded in its
    checkpoint); `RunDirError` if one of them is in `FIXED`. `where` names the checkpoint for messages."""
    now = json.loads(json.dumps(asdict(tc)))  # tuples as lists, as saved
    changes = [
        (k, saved[k], v) for k, v in now.items() if k in saved and k not in PER_INVOCATION and saved[k] != v
    ]
    fixed = [c for c in changes if c[0] in FIXED]
    if fixed:
        said = "; ".join(f"{flag(k)} {new} differs from the run's {old}" for k, old, new in fixed)
        raise RunDirError(
            f"resuming {where}: {said}: {', '.join(flag(k) for k, _, _ in fixed)} cannot change when "
            "resuming (the model or the data stream depend on it); give the run's value, or start a new "
            "run with --fresh or another --run-dir"
        )
    return changes


def describe_changes(changes: list[Change]) -> list[str]:
    return [f"{flag(k)} {_show(new)} replaces {_show(old)} from here" for k, old, new in changes]


def _show(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def check_resume_steps(step: int, tc: TrainConfig) -> str | None:
    """Refuse a resume whose schedule or `stop_at` ends before `step` (it would train nothing, and the
    schedule would not be the run's); one that ends at `step` returns the statement that nothing is left."""
    if tc.steps < step:
        raise RunDirError(
            f"{tc.run_dir}: checkpoint is at step {step}; --steps {tc.steps} would train nothing"
        )
    if tc.stop_at is not None and tc.stop_at < step:
        raise RunDirError(
            f"{tc.run_dir}: checkpoint is at step {step}; --stop-at {tc.stop_at} would train nothing"
        )
    if step == tc.steps:
        return f"the run is complete at step {step} (--steps {step})"
    if step == tc.stop_at:
        return f"--stop-at {step} is the checkpoint's step"
    return None


def apply_changes(
    optimizer: torch.optim.Optimizer, scheduler: LRScheduler, tc: TrainConfig, changes: list[Change]
) -> None:
    """Write changed optimizer and schedule fields into the restored optimizer and scheduler (loading a
    state restores the run's lr, betas and weight decay; the schedule's shape comes from `tc` already)."""
    if not {k for k, _, _ in changes} & _OPTIMIZER_FIELDS:
        return  # nothing to touch: the restored state is bitwise the run's
    scheduler.base_lrs = [tc.lr for _ in optimizer.param_groups]
    lambdas = getattr(scheduler, "lr_lambdas", None)
    for i, group in enumerate(optimizer.param_groups):
        group["initial_lr"] = tc.lr
        group["betas"] = tuple(tc.betas)
        if i == 0:  # the decay group (build_optimizer: matrices first, then vectors and norms at 0)
            group["weight_decay"] = tc.weight_decay
        if lambdas is not None:
            group["lr"] = tc.lr * lambdas[i](scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]  # what get_last_lr() reports


__all__ = [
    "FIXED",
    "PER_INVOCATION",
    "apply_changes",
    "check_resume_steps",
    "config_changes",
    "describe_changes",
    "flag",
]
