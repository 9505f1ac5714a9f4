"""Key/value caches for incremental decoding.

A `KVCache` holds one `LayerCache` per decoder layer. A layer stores named tensors laid out
``[B, S, ...]`` (S = cached positions): GQA layers store ``"k"`` and ``"v"`` ``[B, S, KVH, hd]``
(after RoPE and k_norm); MLA layers store one ``"latent"`` ``[B, S, kv_lora_rank + rope]`` entry that
is ``[kv_a_layernorm(c_kv) ; rotated k_pe]`` (see `widemoe.model.attention`), i.e. exactly
``kv_lora_rank + qk_rope_head_dim`` values per token per layer, as DeepSeek's absorbed MLA.

Growth is geometric (capacity doubles), so appending one token at a time costs amortised O(1)
copies per token instead of re-concatenating the whole history (O(S^2)). `append` returns a view of
the stored entries; a later append never changes the values of a view returned earlier (it writes
past its end, or into a new buffer).

The cache is an inference structure: use it under ``torch.no_grad()`` / ``torch.inference_mode()``.
Batch rows can be dropped or reordered with `select` (e.g. finished sequences, beam search). For
continuous batching (`widemoe.serve.engine`) rows at different lengths live in one left-padded cache:
`pad_left` / `drop_left` add or remove leading (padding) positions of every row, and `concat_rows`
joins two caches of equal length along the batch (the caller keeps the attention mask that says which
positions are padding).
"""

from __future__ import annotations

import torch

_MIN_CAPACITY = 16  # first allocation, in positions; avoids several tiny reallocations at the start


class LayerCache:
    """Named, growable ``[B, S, ...]`` buffers of one layer."""

    def __init__(self) -> None:
        self._buf: dict[str, torch.Tensor] = {}
        self._len: dict[str, int] = {}

    def append(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Append ``x [B, T, ...]`` along dim 1 to entry ``name``; returns all stored ``[B, S, ...]``."""
        if x.dim() < 2:
            raise ValueError(f"LayerCache.append({name!r}): x must be [B, T, ...], got {tuple(x.shape)}")
        buf, n = self._buf.get(name), self._len.get(name, 0)
        need = n + x.shape[1]
        if buf is not None and (buf.shape[0] != x.shape[0] or buf.shape[2:] != x.shape[2:]
                                or buf.dtype != x.dtype or buf.device != x.device):
            raise ValueError(
                f"LayerCache.append({name!r}): x {tuple(x.shape)} {x.dtype} does not match the stored "
                f"[B={buf.shape[0]}, S, {', '.join(map(str, buf.shape[2:]))}] {buf.dtype} on {buf.device}; "
                "the rule is same batch, trailing dims, dtype and device")
        if buf is None or need > buf.shape[1]:
            cap = max(need, _MIN_CAPACITY, 2 * (buf.shape[1] if buf is not None else 0))
            new = x.new_empty((x.shape[0], cap, *x.shape[2:]))
            if buf is not None and n:
                new[:, :n].copy_(buf[:, :n])
            buf = self._buf[name] = new
        buf[:, n:need].copy_(x)
        self._len[name] = need
        return buf[:, :need]

    def get(self, name: str) -> torch.Tensor | None:
        """All stored entries of ``name`` (a view), or None if nothing was appended."""
        buf = self._buf.get(name)
        return None if buf is None else buf[:, : self._len[name]]

    def names(self) -> list[str]:
        return list(self._buf)

    @property
    def seq_len(self) -> int:
        """Positions stored (0 when empty). All entries of a layer are appended together."""
        return max(self._len.values(), default=0)

    def nbytes(self) -> int:
        """Bytes of the stored entries, not counting spare capacity."""
        return sum(self.get(k).numel() * self._buf[k].element_size() for k in self._buf)

    def capacity_nbytes(self) -> int:
        """Bytes allocated, spare capacity included."""
        return sum(b.numel() * b.element_size() for b in self._buf.values())

    def select(self, batch_idx: torch.Tensor) -> None:
        """Keep (or reorder) batch rows: row j becomes old row ``batch_idx[j]``."""
        for k, b in self._buf.items():
            self._buf[k] = b.index_select(0, batch_idx.to(b.device))

    def drop_left(self, n: int) -> None:
        """Forget the first ``n`` positions of every row (a view: the spare capacity at the end stays)."""
        for k, b in self._buf.items():
            self._buf[k] = b[:, n:]
            self._len[k] -= n

    def pad_left(self, n: int) -> None:
        """Put ``n`` zero positions before every row's entries (new buffers, with room to grow)."""
        for k, b in self._buf.items():
            size = self._len[k]
            new = b.new_zeros((b.shape[0], max(n + size, _MIN_CAPACITY, 2 * size), *b.shape[2:]))
            new[:, n : n + size].copy_(b[:, :size])
            self._buf[k], self._len[k] = new, n + size

    def concat_rows(self, other: LayerCache) -> None:
        """Append ``other``'s rows after this cache's rows; both must hold the same entries and length."""
        if set(self._buf) != set(other._buf) or any(self._len[k] != other._len[k] for k in self._buf):
            raise ValueError(
                "LayerCache.concat_rows: both caches must hold the same entries at the same length, got "
                f"{ {k: v for k, v in self._len.items()} } and { {k: v for k, v in other._len.items()} }")
        for k, b in self._buf.items():
            size = self._len[k]
            o = other._buf[k]
            cap = max(b.shape[1], size + _MIN_CAPACITY)  # room to grow, as the rows had
            new = b.new_empty((b.shape[0] + o.shape[0], cap, *b.shape[2:]))
            new[: b.shape[0], :size].copy_(b[:, :size])
            new[b.shape[0] :, :size].copy_(o[:, :size])
            self._buf[k] = new


class KVCache:
    """One `LayerCache` per decoder layer."""

    # Rows at different lengths can share this cache, left-padded (`pad_left`, `concat_rows`); a cache
    # whose layers keep state aligned to absolute positions (DeepSeek-V4's compressed windows) cannot.
    can_pad_rows = True

    def __init__(self, num_layers: int) -> None:
        if num_layers <= 0:
            raise ValueError(f"KVCache: num_layers={num_layers} must be a positive integer")
        self.layers = [LayerCache() for _ in range(num_layers)]
        self._committed = 0  # positions confirmed by `advance`

    def advance(self, T: int) -> None:
        """Mark the end of a forward over T new tokens: checks that every layer appended exactly T.

        seq_len is derived from the stored entries, so this only guards against a layer that skipped
        (or doubled) its append, which would silently misalign positions in later steps.
        """
        want = self._committed + T
        bad = [i for i, lc in enumerate(self.layers) if lc.seq_len != want]
        if bad:
            raise RuntimeError(f"KVCache.advance({T}): layers {bad[:8]} hold "
                               f"{[self.layers[i].seq_len for i in bad[:8]]} positions, expected {want}; "
                               "the rule is every layer appends each new token once")
        self._committed = want

    def layer(self, i: int) -> LayerCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def seq_len(self) -> int:
        """Cached positions, read from layer 0 (the model reads it before its forward appends)."""
        return self.layers[0].seq_len

    def nbytes(self) -> int:
        """Bytes actually held for keys/values/latents over all layers (not spare capacity)."""
        return sum(lc.nbytes() for lc in self.layers)

    def select(self, batch_idx: torch.Tensor) -> None:
        """Keep (or reorder) batch rows in every layer, e.g. to drop finished sequences."""
        for lc in self.layers:
            lc.select(batch_idx)

    def drop_left(self, n: int) -> None:
        """Forget the first ``n`` cached positions of every row in every layer (they must be padding)."""
        if not 0 <= n <= self._committed:
            raise ValueError(f"KVCache.drop_left({n}): the cache holds {self._committed} positions")
        for lc in self.layers:
            lc.drop_left(n)
        self._committed -= n

    def pad_left(self, n: int) -> None:
        """Put ``n`` zero (padding) positions before every row in every layer."""
        for lc in self.layers:
            lc.pad_left(n)
        self._committed += n

    def concat_rows(self, other: KVCache) -> None:
        """Append ``other``'s rows (same layers, same cached length) after this cache's rows."""
        if len(other.layers) != len(self.layers) or other._committed != self._committed:
            raise ValueError(f"KVCache.concat_rows: {len(other.layers)} layers x {other._committed} "
                             f"positions do not match {len(self.layers)} x {self._committed}")
        for lc, lo in zip(self.layers, other.layers):
            lc.concat_rows(lo)


__all__ = ["KVCache", "LayerCache"]
