"""Per-sequence sampling and logprobs for the serving engine.

Each sequence samples with its own `torch.Generator`, from its own row of logits, one row at a time:
the draw a seed gives does not depend on which other sequences share the batch, so the same seed gives
the same text alone and under load (up to the float differences batching itself may cause).

The order is `widemoe.generate`'s (temperature, then top-p over what remains; temperature 0 = greedy).
Logprobs are those of the model's distribution before temperature and top-p, as OpenAI and vLLM report
them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from widemoe.generate import filter_logits


@dataclass(frozen=True)
class TokenLogprob:
    """A token's logprob and the ``k`` most likely (id, logprob) at its position, most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def sample_next(logits_V: torch.Tensor, temperature: float, top_p: float, rng: torch.Generator) -> int:
    """The next token of one sequence from its fp32 logits ``[V]``."""
    if temperature == 0:
        return int(logits_V.argmax())
    probs = filter_logits((logits_V / temperature)[None], None, top_p)[0].softmax(-1)
    return int(torch.multinomial(probs, 1, generator=rng))


def logprob_entry(logprobs_V: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """`token`'s logprob from a log-softmaxed row, with the row's ``k`` best alternatives."""
    top: list[tuple[int, float]] = []
    if k > 0:
        values, ids = logprobs_V.topk(min(k, logprobs_V.shape[-1]))
        top = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs_V[token]), top)


__all__ = ["TokenLogprob", "logprob_entry", "sample_next"]
