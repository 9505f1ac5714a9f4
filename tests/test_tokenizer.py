"""Tests of widemoe.data.tokenizer and the token-id cache of widemoe.data.packing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from corpus_helpers import subset
from widemoe import data
from widemoe.data import tokenizer as tokmod

MIXED = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune,\n"
    "must be in want of a wife. Her £20,000! \u00e9t\u00e9 \u2014 \U0001f600\n\n"
    "def f(x: int) -> int:\n\treturn x ** 2  # tab-indented\n    if x:\n        pass\r\n"
    "Q: Solve for x: 3x + 7 = 25.\nA: 3x = 25 - 7 = 18. x = 18 / 3 = 6. The answer is x = 6.\n"
    "  trailing spaces   \n"
)


@pytest.fixture(scope="module")
def small_corpus() -> data.Corpus:
    return subset(data.build_corpus(math_chars=40_000), 6)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("widemoe-cache")


@pytest.fixture(scope="module")
def tok(small_corpus: data.Corpus, cache: Path) -> data.Tokenizer:
    return data.train_tokenizer(small_corpus, vocab_size=512, cache_dir=cache)


def test_special_tokens_and_vocab(tok: data.Tokenizer) -> None:
    assert tok.eos_id == 0  # the tiny preset's eos_token_id
    assert tok.pad_id == 1
    assert tok.vocab_size == 512
    assert tok.encode("<|endoftext|>") == [0]


def test_round_trip_mixed_text(tok: data.Tokenizer) -> None:
    ids = tok.encode(MIXED)
    assert tok.decode(ids) == MIXED
    assert len(ids) < len(MIXED.encode("utf-8"))  # merges were learned
    batch = tok.encode_batch([MIXED, "x = 1", ""])
    assert batch[0] == ids and tok.decode(batch[1]) == "x = 1" and batch[2] == []
    assert tok.decode([*ids, tok.eos_id]) == MIXED + "<|endoftext|>"
    assert tok.decode([*ids, tok.eos_id], skip_special_tokens=True) == MIXED


def test_training_is_deterministic(small_corpus: data.Corpus, tok: data.Tokenizer) -> None:
    again = data.train_tokenizer(small_corpus, vocab_size=512, use_cache=False)
    assert again.hash == tok.hash
    assert again.encode(MIXED) == tok.encode(MIXED)


def test_cache_hit_loads_without_training(
    small_corpus: data.Corpus, tok: data.Tokenizer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached tokenizer should have been loaded, not retrained")

    monkeypatch.setattr(tokmod.trainers, "BpeTrainer", no_training)
    cached = data.train_tokenizer(small_corpus, vocab_size=512, cache_dir=cache)
    assert cached.hash == tok.hash
    key_dir = cache / "tokenizer" / tokmod.tokenizer_key(small_corpus, 512)
    assert (key_dir / "tokenizer.json").is_file() and (key_dir / "tokenizer_config.json").is_file()
    # Another vocab size or another corpus is another key: it must train (and here it cannot).
    assert tokmod.tokenizer_key(small_corpus, 600) != tokmod.tokenizer_key(small_corpus, 512)
    with pytest.raises(AssertionError, match="should have been loaded"):
        data.train_tokenizer(small_corpus, vocab_size=600, cache_dir=cache)


def test_trained_on_train_split_only() -> None:
    word = "Zyxwvqj"
    docs = [
        data.Document("a", "prose", "train", "the cat sat on the mat. " * 40),
        data.Document("b", "prose", "heldout", (word + " ") * 400),
    ]
    tok = data.train_tokenizer(data.Corpus(tuple(docs)), vocab_size=300, use_cache=False)
    assert len(tok.encode(word)) > 2  # never merged: the held-out text was not seen
    flipped = data.Corpus(
        tuple(data.Document(d.name, d.domain, s, d.text) for d, s in zip(docs, ["heldout", "train"]))
    )
    assert len(data.train_tokenizer(flipped, vocab_size=300, use_cache=False).encode(word)) == 1


def test_save_load_round_trip(tok: data.Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "t")
    loaded = data.Tokenizer.load(tmp_path / "t")
    assert loaded.hash == tok.hash and loaded.eos_id == 0 and loaded.pad_id == 1
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        data.Tokenizer.load(tmp_path / "missing")


def test_autotokenizer_loads_saved_dir(
    tok: data.Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == 0
    assert hf.pad_token == "<|pad|>" and hf.pad_token_id == 1
    assert hf.bos_token_id == 0
    ids = hf.encode(MIXED, add_special_tokens=True)
    assert ids == tok.encode(MIXED)  # no BOS/EOS added implicitly
    assert hf.decode(ids) == MIXED


def test_token_cache_round_trip(
    small_corpus: data.Corpus, tok: data.Tokenizer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = data.tokenize_corpus(small_corpus, tok, cache_dir=cache)
    train = first.splits["train"]
    assert train.ids.dtype == np.uint16
    doc0 = small_corpus.select(split="train")[0]
    assert train.ids[train.offsets[0] : train.offsets[1]].tolist() == tok.encode(doc0.text)
    assert [data.DOMAINS[i] for i in train.domains] == [d.domain for d in small_corpus.select(split="train")]

    def no_encoding(*args: object) -> None:
        raise AssertionError("cached ids should have been loaded")

    monkeypatch.setattr(tok, "encode_batch", no_encoding)
    second = data.tokenize_corpus(small_corpus, tok, cache_dir=cache)
    assert second.key == first.key
    for s in data.SPLITS:
        for part in ("ids", "offsets", "domains"):
            assert np.array_equal(getattr(second.splits[s], part), getattr(first.splits[s], part))


def test_full_corpus_tokenizer(tmp_path: Path) -> None:
    """The one full-size training (vocab 4096, ~2-4 s); a second corpus build maps to the same cache entry."""
    corpus = data.build_corpus()
    tok = data.train_tokenizer(corpus, vocab_size=4096, cache_dir=tmp_path)
    assert tok.vocab_size == 4096 and tok.eos_id == 0 and tok.pad_id == 1
    again = data.train_tokenizer(data.build_corpus(), vocab_size=4096, cache_dir=tmp_path)
    assert again.hash == tok.hash
    assert len(list((tmp_path / "tokenizer").iterdir())) == 1
    prose = "".join(d.text for d in corpus.select("heldout", "prose"))
    assert 3.0 < len(prose) / len(tok.encode(prose)) < 4.2  # chars per token (ecosystem.md: ~3.5)
    assert tok.decode(tok.encode(prose)) == prose


def test_two_builds_give_the_same_token_ids(tok: data.Tokenizer) -> None:
    a = subset(data.build_corpus(math_chars=40_000), 6)
    b = subset(data.build_corpus(math_chars=40_000), 6)
    ta = data.tokenize_corpus(a, tok, use_cache=False)
    tb = data.tokenize_corpus(b, tok, use_cache=False)
    assert ta.key == tb.key
    for s in data.SPLITS:
        assert np.array_equal(ta.splits[s].ids, tb.splits[s].ids)
        assert len(ta.splits[s].ids) > 1000


def test_model_tokenizer_bytes_and_file(tok: data.Tokenizer, tmp_path: Path) -> None:
    """The tokenizer generation uses: UTF-8 bytes without a tokenizer.json, the file's ids with one."""
    raw = tokmod.ModelTokenizer.for_model(None, vocab_size=256, eos_id=0)
    assert raw.is_bytes and raw.encode("é!") == [195, 169, 33] and raw.decode([195, 169, 33, 300]) == "é!"
    with pytest.raises(tokmod.TokenizerError, match="vocab_size=100 < 256"):
        tokmod.ModelTokenizer.for_model(None, vocab_size=100)
    with pytest.raises(tokmod.TokenizerError, match="no tokenizer.json"):
        tokmod.ModelTokenizer.for_model(tmp_path, vocab_size=100)
    tok.save(tmp_path)
    from_file = tokmod.ModelTokenizer.for_model(tmp_path, vocab_size=100, eos_id=0, pad_id=1)
    assert from_file.encode(MIXED) == tok.encode(MIXED) and from_file.decode(tok.encode(MIXED)) == MIXED
    assert (from_file.eos_id, from_file.pad_id) == (0, 1)
