"""What a training run is asked to do: `TrainConfig` (the hyperparameters recorded in every checkpoint and
in the `start` record of `metrics.jsonl`) and the balancing modes it accepts.

The model itself is named by `preset` or `config_file` (a model spec resolved by
`widemoe.hf.resolve.resolve_model`); `widemoe.train.build.model_config_for` applies the training-specific
changes (vocabulary size, balancing mode) to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BALANCE_MODES = ("aux-free", "seq-aux", "switch-aux", "none")
# Coefficients used by the loss-based modes when the model config leaves them at 0.
DEFAULT_SEQ_AUX = 1e-3
DEFAULT_SWITCH_AUX = 1e-2


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (non-finite loss); the message says where the last good state is."""


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    preset: str = "tiny"
    config_file: str | None = None  # a widemoe config (JSON/TOML); overrides `preset`
    model_overrides: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 300  # length of the schedule
    stop_at: int | None = None  # stop after this step (the schedule still spans `steps`); resume later
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    bf16: bool = False
    balance: str = "aux-free"
    bias_update_speed: float | None = None  # None: the model config's value
    eval_every: int = 50
    eval_batches: int = 4  # per domain
    log_every: int = 1
    save_every: int = 100
    keep_last: int = 2
    seed: int = 0
    resume: bool = False
    fresh: bool = False  # start over in a used run directory: its old run's files are deleted
    progress: bool = True

    def __post_init__(self) -> None:
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"balance={self.balance!r} must be one of {BALANCE_MODES}")
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.warmup_steps < 0 or self.lr <= 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0 and lr={self.lr} > 0")
        self.betas = tuple(self.betas)

    @property
    def model_spec(self) -> str:
        """The model to train as one spec: the config file if given, else the preset name."""
        return self.config_file or self.preset


__all__ = ["BALANCE_MODES", "DEFAULT_SEQ_AUX", "DEFAULT_SWITCH_AUX", "TrainConfig", "TrainingStopped"]
