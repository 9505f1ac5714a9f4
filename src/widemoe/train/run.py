"""Glue from the embedded corpus to a trained run directory: data preparation and `run_training`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from widemoe import data as wdata
from widemoe.train.trainer import TrainConfig, Trainer


@dataclass
class TrainData:
    train: wdata.PackedBatches
    heldout: dict[str, list[Any]]
    domains: tuple[str, ...]
    tokenizer: wdata.Tokenizer
    tokens: wdata.TokenizedCorpus


def prepare_train_data(
    tc: TrainConfig, corpus: wdata.Corpus | None = None, cache_dir: str | Path | None = None
) -> TrainData:
    """Corpus -> tokenizer (cached) -> token ids (cached) -> resumable packed batches + held-out batches."""
    corpus = corpus if corpus is not None else wdata.build_corpus()
    tok = wdata.train_tokenizer(corpus, vocab_size=tc.vocab_size, cache_dir=cache_dir)
    tokens = wdata.tokenize_corpus(corpus, tok, cache_dir=cache_dir)
    train = wdata.PackedBatches(tokens, batch_size=tc.batch_size, seq_len=tc.seq_len, seed=tc.seed)
    heldout = wdata.heldout_batches(tokens, tc.batch_size, tc.seq_len, max_batches=tc.eval_batches)
    return TrainData(train=train, heldout=heldout, domains=tuple(heldout), tokenizer=tok, tokens=tokens)


def run_training(
    tc: TrainConfig, corpus: wdata.Corpus | None = None, cache_dir: str | Path | None = None
) -> dict[str, Any]:
    td = prepare_train_data(tc, corpus, cache_dir)
    trainer = Trainer(tc, td, tokenizer=td.tokenizer)
    if trainer.config.vocab_size != td.tokenizer.vocab_size:
        raise ValueError(
            f"model vocab_size={trainer.config.vocab_size} differs from the tokenizer's "
            f"{td.tokenizer.vocab_size}"
        )
    result = trainer.fit()
    result["trainer"] = trainer
    result["data"] = td
    return result
