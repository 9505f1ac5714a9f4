"""Text generation with a KV cache: greedy, temperature, top-k, top-p, seeded sampling, batched prompts.

Prompts of different lengths are left-padded into one batch; an attention mask hides the padding
and position ids restart at each row's first real token, so every row computes exactly what it would
compute alone (tests/test_generate.py checks this against single-prompt runs). For MLA the cache
holds only the compressed latent and the rotated rope key, and decoding uses the absorbed
projections (widemoe.model.attention).

Sampling order follows common practice (transformers' logits processors): temperature, then top-k,
then top-p over the remaining tokens; temperature 0 means greedy.

`stream` yields each step's tokens as they are produced (the CLI prints them as they come);
`generate` collects them. Prompt plus continuation never exceed the model's
`max_position_embeddings` (`position_budget` says whether that limit, not `max_new_tokens`, ends a
run). Sampling parameters are checked in one place, `RULES` / `check_parameter`, with the parameter,
the value and the rule in the message (NaN fails every rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from widemoe.cache import KVCache


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# The one place sampling parameters are checked: (parameter, rule, test). The CLI's flags call
# `check_parameter` too, so a bad value reads the same from Python and from the command line.
# NaN fails every comparison, so each numeric rule is written to be False for NaN.
RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "max_new_tokens": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "temperature": ("a finite number >= 0 (0 = greedy)", lambda v: _is_number(v) and 0 <= v < math.inf),
    "top_k": ("an integer >= 1 (or None)", lambda v: v is None or (_is_int(v) and v >= 1)),
    "top_p": ("in (0, 1] (or None)", lambda v: v is None or (_is_number(v) and 0 < v <= 1)),
    "seed": ("an integer (or None)", lambda v: v is None or _is_int(v)),
    "eos_token_id": ("an integer >= 0 (or None)", lambda v: v is None or (_is_int(v) and v >= 0)),
    "pad_token_id": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
}


def check_parameter(name: str, value: Any) -> Any:
    """`value` if it obeys the rule for sampling parameter `name`; otherwise a `ValueError` naming both."""
    rule, ok = RULES[name]
    if not ok(value):
        raise ValueError(f"{name}={value!r} must be {rule}")
    return value


@dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for name in RULES:
            check_parameter(name, getattr(self, name))


def filter_logits(logits_BV: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus to -inf; the most likely token always survives."""
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, top_k, dim=-1).values[..., -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits_BV, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    return logits_BV


def next_tokens(logits_BV: torch.Tensor, gen: GenerationConfig, rng: torch.Generator | None) -> torch.Tensor:
    logits_BV = logits_BV.float()
    if gen.temperature == 0:
        return logits_BV.argmax(-1)
    logits_BV = filter_logits(logits_BV / gen.temperature, gen.top_k, gen.top_p)
    return torch.multinomial(logits_BV.softmax(-1), 1, generator=rng).squeeze(-1)


def check_prompts(model: torch.nn.Module, prompts: Sequence[Sequence[int]]) -> None:
    """Every prompt non-empty, its ids inside the vocabulary and its length inside the model's positions."""
    if not prompts:
        raise ValueError("no prompts: generate() needs at least one prompt")
    vocab, positions = model.config.vocab_size, model.config.max_position_embeddings
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={vocab}): {bad[:5]}")
        if len(p) > positions:
            raise ValueError(
                f"prompt {i} has {len(p)} tokens; the model has {positions} positions "
                "(max_position_embeddings)"
            )


def position_budget(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], gen: GenerationConfig
) -> tuple[int, bool]:
    """(new tokens that will be generated at most, whether the model's position limit is what bounds them).

    Prompt and continuation together never exceed `max_position_embeddings`: beyond it the model was
    never trained (and a huge `max_new_tokens` would otherwise run for as long as it asks).
    """
    room = model.config.max_position_embeddings - max(len(p) for p in prompts)
    return min(gen.max_new_tokens, room), room < gen.max_new_tokens


def stream(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], gen: GenerationConfig | None = None, **kwargs
) -> Iterator[list[int | None]]:
    """Yield each decoding step as it is produced: one new token per prompt (None once a row has hit EOS).

    Stops after `max_new_tokens` steps, when every row has emitted EOS, or at the model's position limit
    (`position_budget`). The inputs are checked here, before the first step.
    """
    gen = gen or GenerationConfig(**kwargs)
    check_prompts(model, prompts)
    steps, _ = position_budget(model, prompts, gen)
    return _stream(model, prompts, gen, steps)


def generate(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], gen: GenerationConfig | None = None, **kwargs
) -> list[list[int]]:
    """Continue each prompt; returns the new tokens per prompt (up to and including EOS)."""
    out: list[list[int]] = [[] for _ in prompts]
    for step in stream(model, prompts, gen, **kwargs):
        for row, tok in zip(out, step):
            if tok is not None:
                row.append(tok)
    return out


@torch.no_grad()  # on a generator function torch applies no_grad around each step, not to the caller
def _stream(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], gen: GenerationConfig, steps: int
) -> Iterator[list[int | None]]:
    was_training = model.training
    model.eval()
    try:
        yield from _decode(model, prompts, gen, steps)
    finally:
        model.train(was_training)


def _decode(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], gen: GenerationConfig, steps: int
) -> Iterator[list[int | None]]:
    device = next(model.parameters()).device
    B, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((B, L), gen.pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, L), dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        ids[b, L - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[b, L - len(p) :] = True
    rng = None
    if gen.seed is not None:
        rng = torch.Generator(device=device)
        rng.manual_seed(gen.seed)

    cache: KVCache = model.new_cache()
    # the mask of every step is a prefix of one buffer (new tokens are always valid): no per-step concat
    full_mask = torch.ones((B, L + steps), dtype=torch.bool, device=device)
    full_mask[:, :L] = mask
    done = [False] * B  # host-side: one device-to-host copy of the tokens per step, no per-row syncs
    step_ids, S = ids, L
    for _ in range(steps):
        logits = model(step_ids, attention_mask=full_mask[:, :S], cache=cache, logits_to_keep=1).logits[:, -1]
        tok = next_tokens(logits, gen, rng)
        if any(done):  # rows that finished earlier decode the pad token; their outputs are dropped
            tok = tok.masked_fill(torch.tensor(done, device=device), gen.pad_token_id)
        row = tok.tolist()
        yield [None if d else t for d, t in zip(done, row)]
        if gen.eos_token_id is not None:
            done = [d or t == gen.eos_token_id for d, t in zip(done, row)]
        if all(done):
            break
        step_ids, S = tok[:, None], S + 1


__all__ = [
    "RULES",
    "GenerationConfig",
    "check_parameter",
    "check_prompts",
    "filter_logits",
    "generate",
    "next_tokens",
    "position_budget",
    "stream",
]
