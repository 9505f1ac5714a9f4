"""Glue from the embedded corpus to a trained run directory: `run_training(tc)` prepares the data and
fits a `Trainer` (what `widemoe train` calls)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from widemoe import data as wdata
from widemoe.train.build import prepare_train_data
from widemoe.train.config import TrainConfig
from widemoe.train.loop import Trainer


def run_training(
    tc: TrainConfig,
    corpus: wdata.Corpus | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Train as `tc` says; the result of `Trainer.fit` plus the `trainer` and the `data`."""
    td = prepare_train_data(tc, corpus, cache_dir)
    trainer = Trainer(tc, td, tokenizer=td.tokenizer, device=device)
    if trainer.config.vocab_size != td.tokenizer.vocab_size:
        raise ValueError(
            f"model vocab_size={trainer.config.vocab_size} differs from the tokenizer's "
            f"{td.tokenizer.vocab_size}"
        )
    result = trainer.fit()
    result["trainer"] = trainer
    result["data"] = td
    return result
