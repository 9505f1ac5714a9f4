"""Glue from the embedded corpus to a trained run directory: `run_training(tc)` checks the run against
the model (positions, memory), prepares the data and fits a `Trainer` (what `widemoe train` calls).

The checks come first, so a run that cannot train is refused before a tokenizer is trained, a byte is
allocated or a run directory is created.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from widemoe import data as wdata
from widemoe.train.build import (
    base_model_config,
    check_trainable,
    model_config_for,
    prepare_train_data,
    vocab_note,
)
from widemoe.train.config import TrainConfig
from widemoe.train.loop import Trainer
from widemoe.train.run_dir import preflight


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def run_training(
    tc: TrainConfig,
    corpus: wdata.Corpus | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    notify: Callable[[str], None] = _to_stderr,
) -> dict[str, Any]:
    """Train as `tc` says; the result of `Trainer.fit` plus the `trainer` and the `data`. `notify`
    receives the statements of what was decided for the user (a --vocab-size replacing a config's)."""
    preflight(tc.run_dir, resume=tc.resume, fresh=tc.fresh)  # a used or locked run directory
    note = vocab_note(tc, base_model_config(tc))
    if note is not None:
        notify(note)
    config = model_config_for(tc)
    check_trainable(tc, config, torch.device(device))
    if tc.vocab_size is None:  # recorded as the number it is, in checkpoints and metrics
        tc = dataclasses.replace(tc, vocab_size=config.vocab_size)
    td = prepare_train_data(tc, corpus, cache_dir)
    trainer = Trainer(tc, td, tokenizer=td.tokenizer, device=device, notify=notify)
    if trainer.config.vocab_size != td.tokenizer.vocab_size:
        raise ValueError(
            f"model vocab_size={trainer.config.vocab_size} differs from the tokenizer's "
            f"{td.tokenizer.vocab_size}"
        )
    result = trainer.fit()
    result["trainer"] = trainer
    result["data"] = td
    return result
