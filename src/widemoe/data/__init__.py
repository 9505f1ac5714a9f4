"""widemoe.data: the offline three-domain corpus, its byte-level BPE tokenizer, and packed batches.

Everything runs offline and deterministically (see shared/reference/ecosystem.md sections 1-2):

    from widemoe import data
    corpus = data.build_corpus()                       # ~10 MB: Austen prose, stdlib code, seeded math
    tok = data.train_tokenizer(corpus, vocab_size=4096) # trained on the train split, cached on disk
    tokens = data.tokenize_corpus(corpus, tok)         # ids cached as .npy, keyed by tokenizer + corpus
    train = data.PackedBatches(tokens, batch_size=16, seq_len=128, seed=0)
    input_ids, labels, domain_ids = next(train)        # [B, T] int64 each; labels = next token
    held = data.heldout_batches(tokens, 16, 128, max_batches=8)   # {"prose": [...], "code": ..., "math": ...}
    baseline = data.unigram_losses(tokens)             # {"prose": nats, ...}: add-one unigram cross-entropy
    # or all of the first three steps at once: corpus, tok, tokens = data.prepare_data(4096)

Public API:

- ``DOMAINS`` = ("prose", "code", "math") (the index is the domain id), ``SPLITS`` = ("train", "heldout").
- ``build_corpus(math_chars, math_seed) -> Corpus``: ``Document(name, domain, split, text)`` tuples and a
  ``content_hash``; ``Corpus.select(split, domain)``, ``.sizes()``.
  Held-out split, fixed: the last 2 chapters of each novel, the modules in ``CODE_HELDOUT``, math problems
  whose text hashes to 0 mod 20. Documents: one novel chapter, one stdlib module, 8 math problems.
- ``train_tokenizer(corpus, vocab_size=4096, cache_dir=None) -> Tokenizer``: ``encode``,
  ``encode_batch``, ``decode``, ``eos_id`` (0), ``pad_id`` (1), ``vocab_size``, ``hash``, ``save(dir)``,
  ``Tokenizer.load(dir)``; the directory also loads with ``transformers.AutoTokenizer.from_pretrained``.
- ``tokenize_corpus(corpus, tokenizer, cache_dir=None) -> TokenizedCorpus``.
- ``PackedBatches(tokens, batch_size, seq_len, seed)``: endless iterator with ``state_dict()`` /
  ``load_state_dict()``; ``heldout_batches(...)``; ``unigram_loss(train_ids, heldout_ids, vocab_size)``,
  ``unigram_losses(tokens)``.
- ``default_cache_dir()``: ``$WIDEMOE_CACHE`` or ``~/.cache/widemoe``; ``data_dir()``: the vendored
  ``data/`` directory (``$WIDEMOE_DATA_DIR`` overrides).
"""

from __future__ import annotations

from pathlib import Path

from widemoe.data.corpora import (
    CODE_HELDOUT,
    DOMAINS,
    SPLITS,
    STDLIB_MODULES,
    Corpus,
    CorpusError,
    Document,
    build_corpus,
    data_dir,
    default_cache_dir,
)
from widemoe.data.math_gen import generate_problems, make_problem
from widemoe.data.packing import (
    PackedBatches,
    SplitTokens,
    TokenizedCorpus,
    heldout_batches,
    tokenize_corpus,
    unigram_loss,
    unigram_losses,
)
from widemoe.data.tokenizer import EOS_TOKEN, PAD_TOKEN, Tokenizer, train_tokenizer

__all__ = [
    "CODE_HELDOUT",
    "DOMAINS",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "SPLITS",
    "STDLIB_MODULES",
    "Corpus",
    "CorpusError",
    "Document",
    "PackedBatches",
    "SplitTokens",
    "TokenizedCorpus",
    "Tokenizer",
    "build_corpus",
    "data_dir",
    "default_cache_dir",
    "generate_problems",
    "heldout_batches",
    "make_problem",
    "prepare_data",
    "tokenize_corpus",
    "train_tokenizer",
    "unigram_loss",
    "unigram_losses",
]


def prepare_data(
    vocab_size: int = 4096, cache_dir: str | Path | None = None
) -> tuple[Corpus, Tokenizer, TokenizedCorpus]:
    """The demo's data in one call: build the corpus, train (or load) the tokenizer, tokenize (or load)."""
    corpus = build_corpus()
    tokenizer = train_tokenizer(corpus, vocab_size=vocab_size, cache_dir=cache_dir)
    return corpus, tokenizer, tokenize_corpus(corpus, tokenizer, cache_dir=cache_dir)
