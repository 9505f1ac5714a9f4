"""Building a training run's parts before the loop starts: model config, model, `parallelize`, optimizer,
learning-rate schedule, and the data (corpus -> tokenizer -> resumable packed batches).

The order is the one torchtitan uses: build the model on one device, hand it to `parallelize(model, mesh)`
(FSDP2 and expert parallelism plug in there; today it is the identity), and only then build the optimizer
over the parameters `parallelize` returns, so that the optimizer sees the sharded parameters.

Before anything is allocated, `check_trainable` refuses what needs the model config to be seen wrong: a
sequence longer than the model's positions, and a model whose parameters, gradients and AdamW state
(16 bytes a parameter, `widemoe.cost.training_bytes_per_gpu`) would not fit in the device's memory.
The tokenizer's vocabulary is the model spec's `vocab_size` unless the run gives `vocab_size`
(`train_vocab_size`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from widemoe import data as wdata
from widemoe.config import ModelConfig
from widemoe.cost.memory import ADAMW_BYTES_PER_PARAM, training_bytes_per_gpu
from widemoe.cost.units import fmt_bytes, fmt_count
from widemoe.data.tokenizer import TOKENIZER_SETTINGS
from widemoe.hf.resolve import MAX_MEMORY_SHARE, available_memory_bytes, resolve_model
from widemoe.model.causal_lm import WideMoeForCausalLM, build_model
from widemoe.train.config import DEFAULT_SEQ_AUX, DEFAULT_SWITCH_AUX, TrainConfig, TrainConfigError, flag_of


class TrainMemoryError(ValueError):
    """The model's training state does not fit in the device's memory (a failure, not a usage error)."""


# parallelize(model, mesh) -> model; `mesh` is a torch DeviceMesh under torchrun, None on one device.
ParallelizeFn = Callable[[WideMoeForCausalLM, Any], WideMoeForCausalLM]


def base_model_config(tc: TrainConfig) -> ModelConfig:
    """The architecture the run names (its config file, else its preset; any spec `resolve_model` takes),
    before the training changes. Training starts from a fresh initialisation, never from weights."""
    return resolve_model(tc.model_spec).config


# The smallest vocabulary of a tokenizer trained on the corpus: the 256 bytes and the special tokens.
MIN_TRAIN_VOCAB = 256 + len(TOKENIZER_SETTINGS["special_tokens"])


def train_vocab_size(tc: TrainConfig, base: ModelConfig) -> int:
    """The vocabulary of the run's tokenizer and model: `tc.vocab_size` when given (it replaces the model
    spec's), else `model_overrides`' vocab_size, else the model spec's."""
    if tc.vocab_size is not None:
        if tc.vocab_size < MIN_TRAIN_VOCAB:
            raise TrainConfigError(
                f"{flag_of('vocab_size')} = {tc.vocab_size}: must be >= {MIN_TRAIN_VOCAB} "
                "(256 bytes + the tokenizer's special tokens)"
            )
        return tc.vocab_size
    vocab = int(tc.model_overrides.get("vocab_size", base.vocab_size))
    if vocab < MIN_TRAIN_VOCAB:
        raise TrainConfigError(
            f"{tc.model_spec} has vocab_size {vocab}; a tokenizer trained on the corpus needs >= "
            f"{MIN_TRAIN_VOCAB} (256 bytes + special tokens): pass --vocab-size (e.g. 512)"
        )
    return vocab


def vocab_note(tc: TrainConfig, base: ModelConfig) -> str | None:
    """The statement that `--vocab-size` replaces the different vocab_size of a model spec that is a file
    or directory (a config the user wrote), or None."""
    if tc.vocab_size is None or tc.vocab_size == base.vocab_size or not Path(tc.model_spec).exists():
        return None  # a preset's vocab_size is its published model's, replaced as a matter of course
    return f"--vocab-size {tc.vocab_size} replaces vocab_size {base.vocab_size} of {tc.model_spec}"


def model_config_for(tc: TrainConfig) -> ModelConfig:
    """The model config of a run: the named model with the run's vocabulary size, balancing mode and
    `model_overrides` applied."""
    base = base_model_config(tc)
    changes: dict[str, Any] = {**tc.model_overrides, "vocab_size": train_vocab_size(tc, base)}
    if tc.balance == "aux-free":
        changes.update(aux_loss_alpha=0.0, router_aux_loss_coef=0.0)
        if tc.bias_update_speed is not None:
            changes["bias_update_speed"] = tc.bias_update_speed
    elif tc.balance == "seq-aux":
        changes.update(aux_loss_alpha=base.aux_loss_alpha or DEFAULT_SEQ_AUX, router_aux_loss_coef=0.0)
    elif tc.balance == "switch-aux":
        changes.update(
            router_aux_loss_coef=base.router_aux_loss_coef or DEFAULT_SWITCH_AUX, aux_loss_alpha=0.0
        )
    else:
        changes.update(aux_loss_alpha=0.0, router_aux_loss_coef=0.0)
    return base.replace(**changes)


def device_memory_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device, else the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_memory_bytes()


def check_positions(tc: TrainConfig, config: ModelConfig) -> None:
    """Refuse (`TrainConfigError`) a `seq_len` beyond the model's `max_position_embeddings`."""
    if tc.seq_len > config.max_position_embeddings:
        raise TrainConfigError(
            f"{flag_of('seq_len')} = {tc.seq_len}: must be <= max_position_embeddings "
            f"{config.max_position_embeddings} of {tc.model_spec}"
        )


def check_trainable(tc: TrainConfig, config: ModelConfig, device: torch.device) -> None:
    """Refuse a run that cannot train right on `device`, before anything is allocated: `seq_len` beyond
    the model's positions (`check_positions`), or parameters + gradients + AdamW state (fp32, 16 bytes a
    parameter; activations not counted) above `MAX_MEMORY_SHARE` of the free memory (`TrainMemoryError`)."""
    check_positions(tc, config)
    need = training_bytes_per_gpu(config, dp=1)["total"]
    free = device_memory_bytes(device)
    if need > MAX_MEMORY_SHARE * free:
        raise TrainMemoryError(
            f"{tc.model_spec}: ~{fmt_bytes(need)} for parameters, gradients and AdamW state "
            f"({fmt_count(need / ADAMW_BYTES_PER_PARAM)} parameters x {ADAMW_BYTES_PER_PARAM} bytes); "
            f"{fmt_bytes(free)} available ({device.type}), and training needs it within "
            f"{MAX_MEMORY_SHARE:.0%} of that (activations take the rest): train a smaller model"
        )


def parallelize(model: WideMoeForCausalLM, mesh: Any = None) -> WideMoeForCausalLM:
    """Apply the parallelism of `mesh` to `model` (in place) and return it: the identity on one device.

    The seam for data/expert parallelism (torchtitan's `parallelize_fn`): it runs after the model is
    built and moved to its device and before the optimizer is built.
    """
    return model


def lr_lambda(tc: TrainConfig) -> Callable[[int], float]:
    """Linear warmup over `warmup_steps`, then cosine decay to `min_lr_ratio` at `steps` (a factor of lr)."""

    def f(step: int) -> float:
        if step < tc.warmup_steps:
            return (step + 1) / (tc.warmup_steps + 1)
        span = max(1, tc.steps - tc.warmup_steps)
        progress = min(1.0, (step - tc.warmup_steps) / span)
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_optimizer(model: torch.nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (no decay on norms, biases and other vectors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused AdamW is ~10x faster than the for-each version on CPU (shared/reference/cpu-performance.md).
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tc.betas, fused=True)


def build_scheduler(optimizer: torch.optim.Optimizer, tc: TrainConfig) -> LRScheduler:
    """The `lr_lambda` schedule, stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))


@dataclass
class TrainParts:
    """Everything the loop updates: the model (after `parallelize`), its optimizer and schedule."""

    config: ModelConfig
    model: WideMoeForCausalLM
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler


def build_parts(
    tc: TrainConfig,
    device: torch.device,
    mesh: Any = None,
    parallelize_fn: ParallelizeFn = parallelize,
) -> TrainParts:
    """Model config -> model (initialised from `tc.seed` on the CPU, then moved to `device`, so a seed
    gives the same initial weights everywhere) -> `parallelize_fn(model, mesh)` -> optimizer, schedule."""
    config = model_config_for(tc)
    check_trainable(tc, config, device)
    model = build_model(config, seed=tc.seed).to(device)
    model = parallelize_fn(model, mesh)
    optimizer = build_optimizer(model, tc)
    return TrainParts(config, model, optimizer, build_scheduler(optimizer, tc))


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
    vocab = tc.vocab_size if tc.vocab_size is not None else model_config_for(tc).vocab_size
    corpus = corpus if corpus is not None else wdata.build_corpus()
    tok = wdata.train_tokenizer(corpus, vocab_size=vocab, cache_dir=cache_dir)
    tokens = wdata.tokenize_corpus(corpus, tok, cache_dir=cache_dir)
    train = wdata.PackedBatches(tokens, batch_size=tc.batch_size, seq_len=tc.seq_len, seed=tc.seed)
    heldout = wdata.heldout_batches(tokens, tc.batch_size, tc.seq_len, max_batches=tc.eval_batches)
    return TrainData(train=train, heldout=heldout, domains=tuple(heldout), tokenizer=tok, tokens=tokens)


__all__ = [
    "MIN_TRAIN_VOCAB",
    "ParallelizeFn",
    "TrainData",
    "TrainMemoryError",
    "TrainParts",
    "base_model_config",
    "build_optimizer",
    "build_parts",
    "build_scheduler",
    "check_positions",
    "check_trainable",
    "device_memory_bytes",
    "lr_lambda",
    "model_config_for",
    "parallelize",
    "prepare_train_data",
    "train_vocab_size",
    "vocab_note",
]
