"""What a training run is asked to do: `TrainConfig` (the hyperparameters recorded in every checkpoint and
in the `start` record of `metrics.jsonl`), the balancing modes it accepts, and the one validation of its
fields (`TrainConfigError`, with the field, its flag, the value and the rule).

The model itself is named by `preset` or `config_file` (a model spec resolved by
`widemoe.hf.resolve.resolve_model`); `widemoe.train.build.model_config_for` applies the training-specific
changes (vocabulary size, balancing mode) to it, and `widemoe.train.build.check_trainable` checks what
needs the model config (sequence length against its positions, memory).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

BALANCE_MODES = ("aux-free", "seq-aux", "switch-aux", "none")
# Coefficients used by the loss-based modes when the model config leaves them at 0.
DEFAULT_SEQ_AUX = 1e-3
DEFAULT_SWITCH_AUX = 1e-2


class TrainConfigError(ValueError):
    """A training option whose value would make training fail or silently wrong: a usage error."""

    exit_status = 2  # widemoe.commands.errors: a flag value the command checks itself


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (non-finite loss); the message says where the last good state is."""


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    preset: str = "tiny"
    config_file: str | None = None  # a widemoe config (JSON/TOML); overrides `preset`
    model_overrides: dict[str, Any] = field(default_factory=dict)
    vocab_size: int | None = None  # None: the model spec's vocab_size; given, it replaces it
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 300  # length of the schedule
    stop_at: int | None = None  # stop after this step (the schedule still spans `steps`); resume later
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # None: a tenth of `steps` (30 of the default 300)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    bf16: bool = False
    balance: str = "aux-free"
    bias_update_speed: float | None = None  # None: the model config's value
    eval_every: int = 50
    eval_batches: int = 4  # per domain
    log_every: int = 1
    save_every: int = 100
    keep_last: int = 2
    seed: int = 0
    ep: int = 1  # expert-parallel degree under torchrun (must divide the number of processes and E)
    resume: bool = False
    fresh: bool = False  # start over in a used run directory: its old run's files are deleted
    progress: bool = True

    def __post_init__(self) -> None:
        validate(self)
        if self.warmup_steps is None:
            self.warmup_steps = self.steps // 10
        self.run_dir = os.fspath(self.run_dir)
        self.config_file = os.fspath(self.config_file) if self.config_file is not None else None
        self.betas = (float(self.betas[0]), float(self.betas[1]))

    @property
    def model_spec(self) -> str:
        """The model to train as one spec: the config file if given, else the preset name."""
        return self.config_file or self.preset

    @property
    def clip_norm(self) -> float:
        """The max_norm for `clip_grad_norm_`: `grad_clip`, or infinity (no clipping) when it is 0."""
        return self.grad_clip if self.grad_clip > 0 else math.inf


# --- validation --------------------------------------------------------------------------------------

# Integer fields and their smallest value (optional ones may also be None).
_MIN_INT = {
    "seq_len": 1, "batch_size": 1, "grad_accum": 1, "steps": 1, "eval_every": 1,
    "eval_batches": 1, "log_every": 1, "save_every": 1, "keep_last": 1, "seed": 0, "ep": 1,
}
_MIN_OPTIONAL_INT = {"vocab_size": 1, "stop_at": 1, "warmup_steps": 0}
# Float fields: (rule, what the rule says); every float must also be finite.
_FLOAT_RULES = {
    "lr": (lambda v: v > 0, "must be > 0"),
    "min_lr_ratio": (lambda v: 0 <= v <= 1, "must be in [0, 1] (the final lr as a fraction of --lr)"),
    "weight_decay": (lambda v: v >= 0, "must be >= 0"),
    "grad_clip": (lambda v: v >= 0, "must be >= 0 (0 turns clipping off)"),
    "bias_update_speed": (lambda v: v > 0, "must be > 0 (for no balancing, use --balance none)"),
}
_BOOLS = ("bf16", "resume", "fresh", "progress")
_FLAGS = {"config_file": "--config", "progress": "--no-progress"}
_NO_FLAG = ("model_overrides", "min_lr_ratio", "betas", "log_every")


def flag_of(name: str) -> str:
    """How a field is named in messages: `lr (--lr)`, or the bare name of a field without a flag."""
    if name in _NO_FLAG:
        return name
    return f"{name} ({_FLAGS.get(name, '--' + name.replace('_', '-'))})"


def _bad(name: str, value: Any, rule: str) -> TrainConfigError:
    return TrainConfigError(f"{flag_of(name)} = {value!r}: {rule}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_types(tc: TrainConfig) -> None:
    for name in ("run_dir", "preset"):
        value = getattr(tc, name)
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            raise _bad(name, value, "must be a non-empty path or name")
    config_file = tc.config_file
    if config_file is not None and (not isinstance(config_file, (str, os.PathLike)) or not config_file):
        raise _bad("config_file", tc.config_file, "must be a non-empty path")
    if not isinstance(tc.model_overrides, dict):
        raise _bad("model_overrides", tc.model_overrides, "must be a dict of model config fields")
    for name in _BOOLS:
        if not isinstance(getattr(tc, name), bool):
            raise _bad(name, getattr(tc, name), "must be true or false")
    if tc.balance not in BALANCE_MODES:
        raise _bad("balance", tc.balance, f"must be one of {', '.join(BALANCE_MODES)}")


def _check_numbers(tc: TrainConfig) -> None:
    for name, least in (*_MIN_INT.items(), *_MIN_OPTIONAL_INT.items()):
        value = getattr(tc, name)
        if value is None and name in _MIN_OPTIONAL_INT:
            continue
        if not _is_int(value):
            raise _bad(name, value, "must be an integer")
        if value < least:
            raise _bad(name, value, f"must be >= {least}")
    for name, (ok, rule) in _FLOAT_RULES.items():
        value = getattr(tc, name)
        if value is None and name == "bias_update_speed":
            continue
        if not _is_number(value):
            raise _bad(name, value, "must be a number")
        if not math.isfinite(value):
            raise _bad(name, value, "must be finite")
        if not ok(value):
            raise _bad(name, value, rule)
    betas = tc.betas
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise _bad("betas", betas, "must be two numbers (beta1, beta2)")
    if not all(_is_number(b) and math.isfinite(b) and 0 <= b < 1 for b in betas):
        raise _bad("betas", tuple(betas), "each must be a finite number in [0, 1)")


def _check_together(tc: TrainConfig) -> None:
    if tc.warmup_steps is not None and tc.warmup_steps > tc.steps:
        raise _bad("warmup_steps", tc.warmup_steps, f"must be <= --steps {tc.steps} (the schedule's length)")
    if tc.stop_at is not None and tc.stop_at > tc.steps:
        raise _bad("stop_at", tc.stop_at, f"must be <= --steps {tc.steps} (the schedule ends there)")
    if tc.bias_update_speed is not None and tc.balance != "aux-free":
        raise _bad(
            "bias_update_speed", tc.bias_update_speed, f"applies only to --balance aux-free, not {tc.balance}"
        )
    override = tc.model_overrides.get("vocab_size")
    if tc.vocab_size is not None and override is not None and override != tc.vocab_size:
        rule = f"differs from model_overrides vocab_size={override!r}; give one"
        raise _bad("vocab_size", tc.vocab_size, rule)


def validate(tc: TrainConfig) -> None:
    """Refuse (`TrainConfigError`) any field whose value would make training fail or silently wrong:
    types first (a string or a bool where a number belongs), then ranges, then fields that must agree."""
    _check_types(tc)
    _check_numbers(tc)
    _check_together(tc)


__all__ = [
    "BALANCE_MODES",
    "DEFAULT_SEQ_AUX",
    "DEFAULT_SWITCH_AUX",
    "TrainConfig",
    "TrainConfigError",
    "TrainingStopped",
    "flag_of",
    "validate",
]
