"""Glue from the embedded corpus to a trained run directory: `run_training(tc)` checks the run against
the model (positions, memory), prepares the data and fits a `Trainer` (what `widemoe train` calls).

The checks come first, so a run that cannot train is refused before a tokenizer is trained, a byte is
allocated or a run directory is created.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from widemoe import data as wdata
from widemoe.distributed.parallelize import parallelize
from widemoe.hf.resolve import latest_checkpoint
from widemoe.train.build import (
    base_model_config,
    check_positions,
    check_trainable,
    model_config_for,
    prepare_train_data,
    vocab_note,
)
from widemoe.train.config import TrainConfig, TrainConfigError
from widemoe.train.loop import Trainer
from widemoe.train.parallel import RunContext
from widemoe.train.run_dir import preflight


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _silent(message: str) -> None:  # ranks other than 0: rank 0 says it
    pass


def run_vocab_size(run_dir: str | Path) -> int | None:
    """The vocab_size of the newest committed checkpoint of `run_dir` (its config.json), or None."""
    ckpt = latest_checkpoint(Path(run_dir))
    try:
        vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"] if ckpt else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # resuming reports what is wrong with the checkpoint
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


def run_training(
    tc: TrainConfig,
    corpus: wdata.Corpus | None = None,
    cache_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    notify: Callable[[str], None] = _to_stderr,
    ctx: RunContext | None = None,
) -> dict[str, Any]:
    """Train as `tc` says; the result of `Trainer.fit` plus the `trainer` and the `data`. `notify`
    receives the statements of what was decided for the user (a --vocab-size replacing a config's).

    Without `vocab_size`, a resumed run keeps its checkpoint's vocabulary and a new one takes the model
    spec's; the value is written into the config, so checkpoints and metrics record the number.

    On several ranks (`ctx`, from `widemoe.train.parallel`): the device is the rank's, rank 0 checks the
    run directory and prepares the tokenizer cache first (the others then read it), and only rank 0
    speaks."""
    ctx = ctx if ctx is not None else RunContext()
    if ctx.distributed:
        device = ctx.env.device
        notify = notify if ctx.is_main else _silent
        ctx.layout.dims.check_batch(tc.batch_size)
    ctx.main_first(lambda: preflight(tc.run_dir, resume=tc.resume, fresh=tc.fresh))  # a used or locked run
    base = base_model_config(tc)
    check_positions(tc, base)
    note = vocab_note(tc, base)
    if note is not None:
        notify(note)
    if tc.vocab_size is None and tc.resume:
        tc = dataclasses.replace(tc, vocab_size=run_vocab_size(tc.run_dir))
    config = model_config_for(tc)
    if ctx.layout is not None:
        ctx.layout.dims.check_experts(config.n_routed_experts, tc.model_spec)
    check_trainable(tc, config, torch.device(device))
    if tc.vocab_size is None:
        tc = dataclasses.replace(tc, vocab_size=config.vocab_size)
    first = ctx.main_first(lambda: prepare_train_data(tc, corpus, cache_dir))  # fills the cache once
    td = first if first is not None else prepare_train_data(tc, corpus, cache_dir)
    if config.vocab_size != td.tokenizer.vocab_size:  # a BPE stops when the corpus has no more merges
        raise TrainConfigError(
            f"vocab_size {config.vocab_size}: the tokenizer trained on the corpus reached "
            f"{td.tokenizer.vocab_size} tokens; pass --vocab-size {td.tokenizer.vocab_size} or less"
        )
    trainer = Trainer(tc, td, tokenizer=td.tokenizer, device=device, notify=notify, ctx=ctx,
                      mesh=ctx.layout, parallelize_fn=parallelize)
    result = trainer.fit()
    result["trainer"] = trainer
    result["data"] = td
    return result
