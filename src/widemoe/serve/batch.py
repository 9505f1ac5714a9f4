"""The model side of the serving engine: the running sequences' caches, prefill, and one decode step.

Two ways to hold the running sequences, chosen by the model's cache (`KVCache.can_pad_rows`):

- `PaddedBatch` (GQA families and MLA, i.e. every family but DeepSeek-V4): all rows live in one
  left-padded cache with a ``[B, S]`` mask of real positions, as `widemoe.generate` batches prompts.
  New sequences are prefilled together, then joined to the running rows: whichever side is shorter
  gets padding positions in front (`KVCache.pad_left`), and the rows are concatenated. Leaving rows are
  dropped with `select`, and leading positions that became padding in every row are cut. Position ids
  come from the mask (each row counts from its first real token), so each row computes what it would
  compute alone; the decode step is one forward over every running row.
- `PerSequenceBatch` (DeepSeek-V4): its compressed caches pool fixed windows of absolute positions, so
  rows at different positions cannot share a padded cache. Each sequence keeps its own cache and the
  decode step runs one forward per sequence. This is correct but does not batch the matrix products.

Both return fp32 logits: ``prefill`` those after each prompt's last token (and, when asked, at every
prompt position, for echo/prompt logprobs), ``decode`` those after each row's newest token.
Shapes: B rows, S cached positions, L prompt length, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from widemoe.cache import KVCache


def _left_padded(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), L), dtype=torch.long, device=device)
    mask = torch.zeros((len(prompts), L), dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        ids[b, L - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[b, L - len(p) :] = True
    return ids, mask


class PaddedBatch:
    """Running rows in one left-padded `KVCache` (see the module docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # [B, S] bool, True = a real position

    def __len__(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def prefill(self, prompts: Sequence[Sequence[int]], all_positions: bool
                ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Run the prompts, add them as the last rows. Returns the next-token logits ``[n, V]`` and, with
        `all_positions`, each prompt's logits at all of its positions (``[L_i, V]``)."""
        ids, mask = _left_padded(prompts, self.device)
        cache = self.model.new_cache()
        logits = self.model(ids, attention_mask=mask, cache=cache, logits_to_keep=0 if all_positions else 1
                            ).logits.float()
        per_prompt = [logits[b, ids.shape[1] - len(p) :] for b, p in enumerate(prompts)] if all_positions \
            else None
        self._join(cache, mask)
        return logits[:, -1], per_prompt

    def _join(self, cache: KVCache, mask: torch.Tensor) -> None:
        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, mask
            return
        gap = mask.shape[1] - self.mask.shape[1]
        if gap > 0:
            self.cache.pad_left(gap)
            self.mask = torch.cat([self.mask.new_zeros((self.mask.shape[0], gap)), self.mask], dim=1)
        elif gap < 0:
            cache.pad_left(-gap)
            mask = torch.cat([mask.new_zeros((mask.shape[0], -gap)), mask], dim=1)
        self.cache.concat_rows(cache)
        self.mask = torch.cat([self.mask, mask], dim=0)

    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed each row's newest token; returns the logits for the next one ``[B, V]``."""
        assert self.cache is not None and self.mask is not None
        B = self.mask.shape[0]
        self.mask = torch.cat([self.mask, self.mask.new_ones((B, 1))], dim=1)
        ids = torch.tensor(list(tokens), dtype=torch.long, device=self.device)[:, None]
        out = self.model(ids, attention_mask=self.mask, cache=self.cache, logits_to_keep=1)
        return out.logits[:, -1].float()

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only these rows, in this order; cut positions that are padding in every kept row."""
        if not rows:
            self.cache, self.mask = None, None
            return
        assert self.cache is not None and self.mask is not None
        if list(rows) != list(range(self.mask.shape[0])):
            idx = torch.tensor(list(rows), dtype=torch.long, device=self.device)
            self.cache.select(idx)
            self.mask = self.mask.index_select(0, idx)
        lead = int(self.mask.any(dim=0).long().argmax())  # first position some row uses
        if lead > 0:
            self.cache.drop_left(lead)
            self.mask = self.mask[:, lead:]


class PerSequenceBatch:
    """One cache and one forward per running sequence (DeepSeek-V4; see the module docstring)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.caches: list[KVCache] = []

    def __len__(self) -> int:
        return len(self.caches)

    def prefill(self, prompts: Sequence[Sequence[int]], all_positions: bool
                ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        last, full = [], []
        for p in prompts:
            cache = self.model.new_cache()
            ids = torch.tensor([list(p)], dtype=torch.long, device=self.device)
            logits = self.model(ids, cache=cache, logits_to_keep=0 if all_positions else 1).logits[0].float()
            last.append(logits[-1])
            full.append(logits)
            self.caches.append(cache)
        return torch.stack(last), (full if all_positions else None)

    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        out = []
        for cache, tok in zip(self.caches, tokens):
            ids = torch.tensor([[tok]], dtype=torch.long, device=self.device)
            out.append(self.model(ids, cache=cache, logits_to_keep=1).logits[0, -1].float())
        return torch.stack(out)

    def keep(self, rows: Sequence[int]) -> None:
        self.caches = [self.caches[r] for r in rows]


def batch_for(model: torch.nn.Module) -> PaddedBatch | PerSequenceBatch:
    """The batch kind the model's cache allows (`KVCache.can_pad_rows`)."""
    return PaddedBatch(model) if model.new_cache().can_pad_rows else PerSequenceBatch(model)


__all__ = ["PaddedBatch", "PerSequenceBatch", "batch_for"]
