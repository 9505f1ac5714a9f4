"""Tests of widemoe.serve.detok.TextStream: streamed text joins to the non-streamed text, never carries a
half UTF-8 character, and is cut at the earliest stop string even when it spans tokens."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from widemoe import data
from widemoe.data.tokenizer import ModelTokenizer
from widemoe.serve.detok import TextStream

BYTES = ModelTokenizer(None, vocab_size=256)  # widemoe's byte fallback: one token per UTF-8 byte


def byte_decode(ids: list[int]) -> str:
    return BYTES.decode(ids)


def chunk_tokenizer(chunks: list[bytes]):
    """A decoder whose token i is the byte string chunks[i]: lets a test split text where it wants."""
    return lambda ids: b"".join(chunks[i] for i in ids).decode("utf-8", errors="replace")


def non_streamed(decode, ids: list[int], stop: list[str]) -> str:
    """What a non-streaming completion returns: generation ends at the first token after which the text
    (whole characters only: the decode does not end in U+FFFD) holds a stop string, and the text is cut
    at the earliest stop string in it; without a stop, the decode of all the tokens."""
    for end in range(1, len(ids) + 1):
        text = decode(ids[:end])
        cuts = [text.find(s) for s in stop if s in text]
        if cuts and (end == len(ids) or not text.endswith("\ufffd")):
            return text[: min(cuts)]
    return decode(ids)


def stream(decode, ids: list[int], stop: list[str]) -> tuple[list[str], TextStream]:
    """Push every id; the pieces returned by push and, last, by finish."""
    ts = TextStream(decode, stop)
    pieces = [ts.push(i) for i in ids]
    pieces.append(ts.finish())
    return pieces, ts


@pytest.mark.parametrize("text", ["café", "日本語です", "a 😀 b", "👩‍👧 family", "é日😀"])
def test_multibyte_characters_arrive_whole(text: str) -> None:
    ids = BYTES.encode(text)
    ts = TextStream(byte_decode)
    pieces = [ts.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text  # each character was emitted by the push of its last byte
    assert ts.finish() == "" and ts.text == text and not ts.stopped


def test_character_split_over_tokens_is_held_until_complete() -> None:
    chunks = ["日".encode()[:1], "日".encode()[1:], "😀".encode()[:2], "😀".encode()[2:3], "😀".encode()[3:]]
    ts = TextStream(chunk_tokenizer(chunks))
    assert [ts.push(i) for i in range(5)] == ["", "日", "", "", "😀"]


def test_incomplete_character_at_the_end_is_flushed_as_the_decoder_has_it() -> None:
    ids = BYTES.encode("ok 日")[:-1]
    pieces, ts = stream(byte_decode, ids, [])
    assert pieces[-1] == "\ufffd" and "".join(pieces) == byte_decode(ids) == ts.text


WORDS = [b"Hel", b"lo", b" wor", b"ld", b"!", b" Hello"]


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["o wo"], "Hell"),  # spans "lo" | " wor"
        (["Hel"], ""),  # at the very start
        (["world", "lo w"], "Hel"),  # the earliest match wins, whatever the list order
        (["lo w", "world"], "Hel"),
        (["ld!", "d"], "Hello worl"),  # "d" completes first: generation stops before "ld!" can
        (["o w", "lo wor"], "Hel"),  # both complete with " wor": the one starting first wins
        (["!"], "Hello world"),
        (["xyz"], "Hello world! Hello"),  # never matches
        (["Hello!"], "Hello world! Hello"),  # a held-back prefix that never completes
        ([], "Hello world! Hello"),
    ],
)
def test_stop_strings(stop: list[str], expected: str) -> None:
    decode = chunk_tokenizer(WORDS)
    ids = list(range(len(WORDS)))
    pieces, ts = stream(decode, ids, stop)
    assert "".join(pieces) == expected == ts.text == non_streamed(decode, ids, stop)
    assert ts.stopped == (expected != decode(ids))


def test_text_that_may_become_a_stop_string_is_held_back() -> None:
    ts = TextStream(chunk_tokenizer(WORDS), ["lo there"])
    assert ts.push(0) == "He"  # "l" could begin "lo there"
    assert ts.push(1) == "l"  # so could "lo"
    assert ts.push(2) == "lo wor"  # " wor" rules it out
    assert not ts.stopped


def test_after_a_stop_pushes_return_nothing() -> None:
    ts = TextStream(chunk_tokenizer(WORDS), ["o w"])
    assert [ts.push(i) for i in range(3)] == ["Hel", "l", ""]  # "o" held, then cut
    assert ts.stopped and ts.push(3) == "" and ts.push(4) == "" and ts.finish() == ""
    assert ts.text == "Hell"


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="empty stop string"):
        TextStream(byte_decode, ["ok", ""])


def test_push_after_finish_is_an_error() -> None:
    ts = TextStream(byte_decode)
    ts.finish()
    with pytest.raises(RuntimeError):
        ts.push(65)


def test_decoding_window_stays_short_on_long_outputs() -> None:
    seen: list[int] = []

    def counting_decode(ids: list[int]) -> str:
        seen.append(len(ids))
        return byte_decode(ids)

    text = "Emma Woodhouse, handsome, clever, and rich — 日本 😀. " * 200
    pieces, ts = stream(counting_decode, BYTES.encode(text), ["never appears"])
    assert "".join(pieces) == text
    assert max(seen) <= 8  # a window of a few tokens, not the whole output
    assert len(seen) <= 3 * len(BYTES.encode(text))


stop_text = st.text(alphabet="ab é日😀\ufffd", min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(
    ids=st.lists(st.integers(0, 255), max_size=40),
    stop=st.lists(stop_text, max_size=3),
    take=st.tuples(st.integers(0, 40), st.integers(1, 6)),
)
def test_stream_joins_to_the_non_streamed_text_bytes(ids: list[int], stop: list[str], take) -> None:
    text = byte_decode(ids)
    start, length = take
    if text[start : start + length]:
        stop = [*stop, text[start : start + length]]  # a stop string that does occur
    pieces, ts = stream(byte_decode, ids, stop)
    assert "".join(pieces) == non_streamed(byte_decode, ids, stop) == ts.text
    assert all("\ufffd" not in p or "\ufffd" in text for p in pieces)


CHUNKS = [b"a", b"b", b" ", "é".encode(), "é".encode()[:1], "é".encode()[1:], "😀".encode()[:3], b"\x80"]
CHUNKS += [b"ab", b"a\xe6", "😀".encode()[3:], "日".encode()[:2], "日".encode()[2:] + b"a"]


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, len(CHUNKS) - 1), max_size=30), stop=st.lists(stop_text, max_size=3))
def test_stream_joins_to_the_non_streamed_text_chunks(ids: list[int], stop: list[str]) -> None:
    decode = chunk_tokenizer(CHUNKS)
    pieces, ts = stream(decode, ids, stop)
    assert "".join(pieces) == non_streamed(decode, ids, stop) == ts.text


@pytest.fixture(scope="module")
def trained_tokenizer() -> data.Tokenizer:
    texts = ["It is a truth universally acknowledged. Her £20,000! été — 日本 😀\n", "def f(x): return x\n"]
    docs = tuple(data.Document(f"d{i}", "prose", "train", t * 20) for i, t in enumerate(texts))
    return data.train_tokenizer(data.Corpus(docs), vocab_size=300, use_cache=False)


def test_trained_byte_level_bpe_tokenizer(trained_tokenizer: data.Tokenizer) -> None:
    text = "A truth — été, 日本 and 😀😀: universally acknowledged!\n\tdef f(x): return x"
    ids = trained_tokenizer.encode(text)
    decode = trained_tokenizer.decode
    for stop in ([], ["😀:"], ["日本", "été"], ["x"], ["never"]):
        pieces, ts = stream(decode, ids, stop)
        assert "".join(pieces) == non_streamed(decode, ids, stop) == ts.text
        assert all("\ufffd" not in p for p in pieces)
    assert "".join(stream(decode, ids, [])[0]) == text
