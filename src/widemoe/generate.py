"""Text generation with a KV cache: greedy, temperature, top-k, top-p, seeded sampling, batched prompts.

Prompts of different lengths are left-padded into one batch; an attention mask hides the padding
and position ids restart at each row's first real token, so every row computes exactly what it would
compute alone (tests/test_generate.py checks this against single-prompt runs). For MLA the cache
holds only the compressed latent and the rotated rope key, and decoding uses the absorbed
projections (widemoe.model.attention).

Sampling order follows common practice (transformers' logits processors): temperature, then top-k,
then top-p over the remaining tokens; temperature 0 means greedy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from widemoe.cache import KVCache


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
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1 or None")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] or None")


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


@torch.no_grad()
def generate(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], gen: GenerationConfig | None = None, **kwargs
) -> list[list[int]]:
    """Continue each prompt; returns the new tokens per prompt (up to and including EOS)."""
    gen = gen or GenerationConfig(**kwargs)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate() needs at least one prompt, and every prompt needs at least one token")
    vocab = model.config.vocab_size
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={vocab}): {bad[:5]}")
    was_training = model.training
    model.eval()
    try:
        return _generate(model, prompts, gen)
    finally:
        model.train(was_training)


def _generate(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], gen: GenerationConfig
) -> list[list[int]]:
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
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_ids, step_mask = ids, mask
    for _ in range(gen.max_new_tokens):
        logits = model(step_ids, attention_mask=step_mask, cache=cache, logits_to_keep=1).logits[:, -1]
        tok = next_tokens(logits, gen, rng)
        tok = torch.where(done, torch.full_like(tok, gen.pad_token_id), tok)
        for b in range(B):
            if not done[b]:
                out[b].append(int(tok[b]))
        if gen.eos_token_id is not None:
            done |= tok == gen.eos_token_id
        if bool(done.all()):
            break
        step_ids = tok[:, None]
        step_mask = torch.cat([step_mask, torch.ones((B, 1), dtype=torch.bool, device=device)], dim=1)
    return out


__all__ = ["GenerationConfig", "filter_logits", "generate", "next_tokens"]
