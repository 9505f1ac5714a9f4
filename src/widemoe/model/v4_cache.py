"""DeepSeek-V4 decoding cache: a sliding window plus the growing compressed memories of CSA/HCA layers.

Follows transformers 5.24 `DeepseekV4HCACache` / `DeepseekV4CSACache` (shared/reference/deepseek_v4.md
section 2.11) in what it stores, with widemoe's amortised growth (`widemoe.cache.LayerCache`) for the
compressed entries instead of a concatenation per step. Per layer:

- ``window`` ``[B, <= W-1, d]``: the last W-1 rotated K=V vectors (the next query adds itself, so the
  attention sees W tokens). It never grows past W-1: the sliding part costs a fixed (W-1)·d per layer.
- per compressor name (``"compressor"`` for CSA/HCA, ``"indexer"`` for CSA's lightning indexer):
  * ``entries`` ``[B, N, width]``: emitted compressed entries (RoPE applied), one per complete window;
  * ``buf_kv`` / ``buf_gate`` ``[B, < rate, C]``: projections of tokens of the still-open window;
  * ``prior_kv`` / ``prior_gate`` ``[B, rate, width]`` (CSA only): the first-half ("Ca") channels of the
    last complete window, which the next window's entry pools over (the overlap state);
  * ``count``: entries emitted, so ``count * rate`` is the position of the next window's first token.

`nbytes()` counts what the KV formula counts (window + compressed entries + index keys: for V4-Flash
160 elements per token per CSA layer and 4 per HCA layer); `state_nbytes()` the open-window buffers and
overlap state, bounded by a few windows per layer and independent of the context length.

Use under ``torch.no_grad()``; rows can be reordered or dropped with `select`.
Shapes: B batch, T new tokens, d head width, N compressed entries, C projected channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from widemoe.cache import KVCache, LayerCache


@dataclass
class CompressorState:
    entries: LayerCache = field(default_factory=LayerCache)
    buf_kv: torch.Tensor | None = None
    buf_gate: torch.Tensor | None = None
    prior_kv: torch.Tensor | None = None
    prior_gate: torch.Tensor | None = None
    count: int = 0

    def take_windows(self, kv_BTC: torch.Tensor, gate_BTC: torch.Tensor,
                     rate: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Prepend the open window, keep the incomplete tail buffered, return the complete windows and
        the position of their first token."""
        first = self.count * rate
        if self.buf_kv is not None and self.buf_kv.shape[1]:
            kv_BTC = torch.cat([self.buf_kv, kv_BTC], dim=1)
            gate_BTC = torch.cat([self.buf_gate, gate_BTC], dim=1)
        usable = (kv_BTC.shape[1] // rate) * rate
        self.buf_kv, self.buf_gate = kv_BTC[:, usable:], gate_BTC[:, usable:]
        return kv_BTC[:, :usable], gate_BTC[:, :usable], first

    def add_entries(self, new_BNw: torch.Tensor) -> torch.Tensor:
        self.count += new_BNw.shape[1]
        if new_BNw.shape[1] == 0 and self.entries.get("e") is None:
            return new_BNw
        return self.entries.append("e", new_BNw)

    def select(self, idx: torch.Tensor) -> None:
        self.entries.select(idx)
        for name in ("buf_kv", "buf_gate", "prior_kv", "prior_gate"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.index_select(0, idx.to(t.device)))

    def state_nbytes(self) -> int:
        ts = (self.buf_kv, self.buf_gate, self.prior_kv, self.prior_gate)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


class V4LayerCache:
    """Window and compressor states of one V4 layer."""

    def __init__(self, sliding_window: int) -> None:
        self.keep = sliding_window - 1
        self.window: torch.Tensor | None = None
        self.comp: dict[str, CompressorState] = {}
        self.seen = 0  # tokens that went through this layer

    @property
    def seq_len(self) -> int:
        """Tokens this layer has taken (what `KVCache.advance` checks)."""
        return self.seen

    def update_window(self, kv_BTd: torch.Tensor) -> torch.Tensor:
        """Returns the stored window followed by the new keys ``[B, P + T, d]``; keeps the last W-1."""
        full = kv_BTd if self.window is None else torch.cat([self.window, kv_BTd], dim=1)
        self.window = full[:, max(0, full.shape[1] - self.keep):] if self.keep > 0 else full[:, :0]
        self.seen += kv_BTd.shape[1]
        return full

    def state(self, name: str) -> CompressorState:
        if name not in self.comp:
            self.comp[name] = CompressorState()
        return self.comp[name]

    def nbytes(self) -> int:
        n = 0 if self.window is None else self.window.numel() * self.window.element_size()
        return n + sum(s.entries.nbytes() for s in self.comp.values())

    def state_nbytes(self) -> int:
        return sum(s.state_nbytes() for s in self.comp.values())

    def select(self, idx: torch.Tensor) -> None:
        if self.window is not None:
            self.window = self.window.index_select(0, idx.to(self.window.device))
        for s in self.comp.values():
            s.select(idx)


class V4Cache(KVCache):
    """One `V4LayerCache` per decoder layer; `layer`, `advance`, `nbytes` and `select` are KVCache's."""

    # The compressors pool fixed windows of absolute positions (count * rate), so left padding would
    # shift every window: rows at different positions cannot share one padded cache.
    can_pad_rows = False

    def __init__(self, num_layers: int, sliding_window: int) -> None:
        if num_layers <= 0:
            raise ValueError(f"V4Cache: num_layers={num_layers} must be a positive integer")
        self.layers = [V4LayerCache(sliding_window) for _ in range(num_layers)]
        self._committed = 0

    @property
    def seq_len(self) -> int:
        """Positions confirmed by `advance` (a layer's window keeps only the last W-1 of them)."""
        return self._committed

    def state_nbytes(self) -> int:
        """Bytes of the open-window buffers and CSA overlap state (bounded, not per token)."""
        return sum(lc.state_nbytes() for lc in self.layers)


__all__ = ["CompressorState", "V4Cache", "V4LayerCache"]
