"""Token streams, packed training batches with domain labels, held-out batches, and a unigram baseline.

Packing follows the usual GPT-style recipe (documents joined with an EOS separator, the stream cut into
fixed windows, labels = the next token), with the domain of every position carried alongside so routing
can be analysed per domain.

Shapes: B batch, T sequence length, N tokens in a stream.

- ``tokenize_corpus(corpus, tokenizer, cache_dir)`` encodes every document once and caches the ids on disk
  (``<cache>/tokens/<key>/*.npy``, uint16 when the vocabulary fits, else int32), keyed by a hash of
  (tokenizer hash, corpus content hash): a second run loads them in milliseconds.
- ``PackedBatches(tokens, batch_size, seq_len, seed)`` yields ``(input_ids_BT, labels_BT, domain_ids_BT)``
  int64 tensors forever. Epoch ``e`` shuffles the train documents with ``random.Random(f"...:{seed}:{e}")``
  (so prose, code and math interleave), appends EOS to each document and concatenates them into one
  stream ``s`` of N tokens. As in the classic "batchify" layout, ``s`` is cut into B equal lanes of
  ``L = ((N - 1) // B) // T * T`` tokens, and row b of batch k is the window ``s[b*L + k*T : b*L + k*T +
  T + 1]``: the rows of one batch come from B far-apart places of the shuffled stream, so a batch mixes
  domains instead of holding one long document. Consecutive windows share one boundary token, so every
  token is a label at most once; inputs are a window's first T tokens and labels its last T. The < B*T
  tokens that fill no lane are dropped and the next epoch reshuffles. ``domain_ids[b, t]`` is the domain
  of ``input_ids[b, t]``; an EOS separator belongs to the document it ends. ``state_dict()`` after batch n
  holds the cursor of batch n + 1, and ``load_state_dict`` resumes exactly there.
- ``heldout_batches(tokens, batch_size, seq_len)`` gives, per domain, the held-out documents in corpus
  order (no shuffle), packed the same way: fixed and deterministic. The last batch may have fewer rows.
- ``unigram_loss(train_ids, heldout_ids, vocab_size)`` is the cross-entropy (nats/token) of an add-one
  smoothed unigram model; ``unigram_losses(tokens)`` gives it per domain (counts from the whole train
  stream, evaluated on each domain's held-out stream): the "no context at all" baseline of the demo.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from widemoe.data.corpora import DOMAINS, SPLITS, Corpus, default_cache_dir
from widemoe.data.tokenizer import Tokenizer

__all__ = [
    "PackedBatches",
    "SplitTokens",
    "TokenizedCorpus",
    "heldout_batches",
    "tokenize_corpus",
    "unigram_loss",
    "unigram_losses",
]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids_BT, labels_BT, domain_ids_BT (int64)
_META = "meta.json"


@dataclass(frozen=True)
class SplitTokens:
    """The documents of one split, tokenized: doc i is ``ids[offsets[i]:offsets[i+1]]`` (no EOS)."""

    ids: np.ndarray  # [N] uint16 or int32
    offsets: np.ndarray  # [num_docs + 1] int64
    domains: np.ndarray  # [num_docs] int8, index into DOMAINS

    @property
    def num_docs(self) -> int:
        return len(self.domains)

    def stream(self, order: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Documents in ``order``, each followed by EOS: (ids_N, domain_ids_N)."""
        lens = (self.offsets[1:] - self.offsets[:-1])[order]
        starts = self.offsets[:-1][order]
        out_starts = np.cumsum(lens + 1) - (lens + 1)
        total = int((lens + 1).sum())
        out = np.full(total, eos_id, dtype=self.ids.dtype)
        is_token = np.ones(total, dtype=bool)
        is_token[out_starts + lens] = False  # the EOS slot after each document
        dst = np.flatnonzero(is_token)
        out[dst] = self.ids[dst + np.repeat(starts - out_starts, lens)]
        return out, np.repeat(self.domains[order], lens + 1)

    def domain_stream(self, domain: str, eos_id: int) -> np.ndarray:
        """The ids of one domain's documents in corpus order, each followed by EOS."""
        order = np.flatnonzero(self.domains == DOMAINS.index(domain))
        return self.stream(order, eos_id)[0]


@dataclass(frozen=True)
class TokenizedCorpus:
    splits: dict[str, SplitTokens]
    eos_id: int
    vocab_size: int
    key: str  # hash of (tokenizer hash, corpus content hash)

    def num_tokens(self, split: str, domain: str | None = None) -> int:
        """Tokens of the documents (EOS separators not counted)."""
        s = self.splits[split]
        lens = s.offsets[1:] - s.offsets[:-1]
        return int(lens.sum() if domain is None else lens[s.domains == DOMAINS.index(domain)].sum())


def _split_from_ids(docs_ids: list[list[int]], domains: list[int], dtype: type) -> SplitTokens:
    lens = np.array([len(d) for d in docs_ids], dtype=np.int64)
    offsets = np.zeros(len(docs_ids) + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    flat = np.fromiter((t for d in docs_ids for t in d), dtype=dtype, count=int(offsets[-1]))
    return SplitTokens(flat, offsets, np.array(domains, dtype=np.int8))


def tokenize_corpus(
    corpus: Corpus, tokenizer: Tokenizer, cache_dir: str | Path | None = None, use_cache: bool = True
) -> TokenizedCorpus:
    """Encode every document of ``corpus`` (both splits), loading/saving the ids from/to the disk cache."""
    key = hashlib.sha256(f"{tokenizer.hash}\0{corpus.content_hash}".encode()).hexdigest()[:20]
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    target = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "tokens" / key
    if use_cache and (target / _META).is_file():
        splits = {
            s: SplitTokens(*(np.load(target / f"{s}.{part}.npy") for part in ("ids", "offsets", "domains")))
            for s in SPLITS
        }
        return TokenizedCorpus(splits, tokenizer.eos_id, tokenizer.vocab_size, key)
    splits = {}
    for s in SPLITS:
        docs = corpus.select(split=s)
        ids = tokenizer.encode_batch([d.text for d in docs])
        splits[s] = _split_from_ids(ids, [DOMAINS.index(d.domain) for d in docs], dtype)
    out = TokenizedCorpus(splits, tokenizer.eos_id, tokenizer.vocab_size, key)
    if use_cache:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            for s, st in splits.items():
                for part in ("ids", "offsets", "domains"):
                    np.save(tmp / f"{s}.{part}.npy", getattr(st, part), allow_pickle=False)
            meta = {"tokenizer": tokenizer.hash, "corpus": corpus.content_hash, "dtype": np.dtype(dtype).name}
            (tmp / _META).write_text(json.dumps(meta) + "\n")  # written last: marks a complete entry
            os.replace(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent writer got there first with the same ids
    return out


def _windows(starts: np.ndarray, seq_len: int) -> np.ndarray:
    """Stream indices of the windows of length T+1 that begin at ``starts``: [len(starts), T+1]."""
    return starts.astype(np.int64)[:, None] + np.arange(seq_len + 1, dtype=np.int64)[None, :]


def _batch(ids_N: np.ndarray, dom_N: np.ndarray, idx: np.ndarray) -> Batch:
    w = torch.from_numpy(ids_N[idx].astype(np.int64))
    return (
        w[:, :-1].contiguous(),
        w[:, 1:].contiguous(),
        torch.from_numpy(dom_N[idx[:, :-1]].astype(np.int64)),
    )


class PackedBatches:
    """An endless, resumable iterator of packed training batches (see the module docstring)."""

    def __init__(
        self, tokens: TokenizedCorpus, batch_size: int, seq_len: int, seed: int = 0, split: str = "train"
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must both be >= 1")
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is not one of {SPLITS}")
        self.data = tokens.splits[split]
        self.eos_id, self.data_key = tokens.eos_id, tokens.key
        self.batch_size, self.seq_len, self.seed, self.split = batch_size, seq_len, seed, split
        stream_len = int(self.data.offsets[-1]) + self.data.num_docs  # the same for every epoch
        self.batches_per_epoch = ((stream_len - 1) // batch_size) // seq_len
        self.lane_len = self.batches_per_epoch * seq_len  # tokens per lane (row) per epoch
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"split {split!r} has {stream_len} tokens with separators: too few for one batch of "
                f"batch_size={batch_size} x seq_len={seq_len} (+1)"
            )
        self.epoch, self.step = 0, 0
        self._cached_epoch: int | None = None
        self._ids_N = self._dom_N = np.empty(0)

    def _epoch_stream(self) -> None:
        if self._cached_epoch != self.epoch:
            order = list(range(self.data.num_docs))
            # A str seed hashes with SHA-512 inside random: the same order on every Python >= 3.2.
            random.Random(f"widemoe-pack:{self.seed}:{self.epoch}").shuffle(order)
            self._ids_N, self._dom_N = self.data.stream(np.array(order, dtype=np.int64), self.eos_id)
            self._cached_epoch = self.epoch

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> Batch:
        self._epoch_stream()
        starts = np.arange(self.batch_size, dtype=np.int64) * self.lane_len + self.step * self.seq_len
        idx = _windows(starts, self.seq_len)
        out = _batch(self._ids_N, self._dom_N, idx)
        self.step += 1
        if self.step == self.batches_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return out

    def _fixed(self) -> dict[str, Any]:
        return {
            "data_key": self.data_key,
            "split": self.split,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "num_docs": self.data.num_docs,
            "num_tokens": int(self.data.offsets[-1]),
        }

    def state_dict(self) -> dict[str, Any]:
        """The cursor: the next batch is batch ``step`` of epoch ``epoch``. JSON-serialisable."""
        return {"version": 1, **self._fixed(), "epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in self._fixed().items():
            if state.get(name) != value:
                raise ValueError(
                    f"PackedBatches state {name}={state.get(name)!r} does not match this iterator's "
                    f"{name}={value!r}: resuming needs the same data, seed and shape"
                )
        if not 0 <= int(state["step"]) < self.batches_per_epoch:
            raise ValueError(
                f"PackedBatches state step={state['step']} outside [0, {self.batches_per_epoch})"
            )
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def heldout_batches(
    tokens: TokenizedCorpus,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    domains: tuple[str, ...] = DOMAINS,
) -> dict[str, list[Batch]]:
    """Per domain, the held-out documents packed in corpus order: fixed batches for evaluation."""
    data = tokens.splits["heldout"]
    out: dict[str, list[Batch]] = {}
    for domain in domains:
        ids_N = data.domain_stream(domain, tokens.eos_id)
        n_windows = (len(ids_N) - 1) // seq_len
        if n_windows < 1:
            raise ValueError(
                f"held-out {domain!r} has {len(ids_N)} tokens: too few for seq_len={seq_len} (+1)"
            )
        dom_N = np.full(len(ids_N), DOMAINS.index(domain), dtype=np.int8)
        batches = []
        for first in range(0, n_windows, batch_size):
            if max_batches is not None and len(batches) >= max_batches:
                break
            rows = np.arange(first, min(first + batch_size, n_windows), dtype=np.int64)
            idx = _windows(rows * seq_len, seq_len)
            batches.append(_batch(ids_N, dom_N, idx))
        out[domain] = batches
    return out


def unigram_loss(train_ids: np.ndarray, heldout_ids: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of ``heldout_ids`` under add-one smoothed unigram counts of ``train_ids``.

    p(v) = (count_train(v) + 1) / (len(train_ids) + vocab_size); loss = -mean(log p(heldout_ids)).
    """
    train_ids, heldout_ids = np.asarray(train_ids), np.asarray(heldout_ids)
    if heldout_ids.size == 0:
        raise ValueError("heldout_ids is empty: the loss of no tokens is undefined")
    for name, a in (("train_ids", train_ids), ("heldout_ids", heldout_ids)):
        if a.size and (int(a.min()) < 0 or int(a.max()) >= vocab_size):
            raise ValueError(f"{name} holds ids outside [0, vocab_size={vocab_size})")
    counts = np.bincount(train_ids.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts) - np.log(counts.sum())
    return float(-log_p[heldout_ids.astype(np.int64)].mean())


def unigram_losses(tokens: TokenizedCorpus) -> dict[str, float]:
    """The unigram baseline per domain: train counts from all domains, loss on each held-out stream."""
    train = tokens.splits["train"]
    train_N = train.stream(np.arange(train.num_docs), tokens.eos_id)[0]
    held = tokens.splits["heldout"]
    return {
        d: unigram_loss(train_N, held.domain_stream(d, tokens.eos_id), tokens.vocab_size)
        for d in DOMAINS
        if (held.domains == DOMAINS.index(d)).any()
    }
