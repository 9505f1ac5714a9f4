"""Tests of widemoe.data's corpus, math generator and packing (the tokenizer has tests/test_tokenizer.py)."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import math
import random
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from widemoe import data
from widemoe.data import corpora
from widemoe.data.packing import SplitTokens, TokenizedCorpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus() -> data.Corpus:
    return data.build_corpus()


# --- corpus -------------------------------------------------------------------------------------------


def test_corpus_build_is_deterministic(corpus: data.Corpus) -> None:
    again = data.build_corpus()
    assert again.content_hash == corpus.content_hash
    assert again.documents == corpus.documents


def test_content_hash_depends_on_math_seed() -> None:
    a = data.build_corpus(math_chars=20_000, math_seed=1)
    b = data.build_corpus(math_chars=20_000, math_seed=2)
    assert a.content_hash != b.content_hash


def test_every_domain_in_both_splits_and_sizes(corpus: data.Corpus) -> None:
    sizes = corpus.sizes()
    for domain in data.DOMAINS:
        for split in data.SPLITS:
            assert sizes[f"{domain}/{split}"]["docs"] > 0, (domain, split)
    mb = {d: (sizes[f"{d}/train"]["bytes"] + sizes[f"{d}/heldout"]["bytes"]) / 1e6 for d in data.DOMAINS}
    assert 3.9 < mb["prose"] < 4.1  # the six novels, 4.03 MB
    assert 3.0 < mb["code"] < 4.5
    assert 2.3 < mb["math"] < 2.7  # default math_chars = 2.5 M
    for domain in data.DOMAINS:  # held out: a few percent to ~11 %, never most of a domain
        frac = sizes[f"{domain}/heldout"]["bytes"] / (mb[domain] * 1e6)
        assert 0.02 < frac < 0.15, (domain, frac)


def test_train_and_heldout_are_disjoint(corpus: data.Corpus) -> None:
    train, held = corpus.select(split="train"), corpus.select(split="heldout")
    assert not {(d.domain, d.name) for d in train} & {(d.domain, d.name) for d in held}
    assert not {d.text for d in train} & {d.text for d in held}
    # Math: no single problem appears in both splits.
    problems = {s: {p for d in corpus.select(s, "math") for p in d.text.split("\n\n")} for s in data.SPLITS}
    assert problems["train"] and problems["heldout"]
    assert not problems["train"] & problems["heldout"]


def test_heldout_rules_are_the_documented_ones(corpus: data.Corpus) -> None:
    held_code = {d.name for d in corpus.select("heldout", "code")}
    assert held_code == set(data.CODE_HELDOUT)
    prose = corpus.select(domain="prose")
    for title in {d.name.split("/")[0] for d in prose}:
        chapters = [d for d in prose if d.name.split("/")[0] == title]
        assert [d.split for d in chapters[-2:]] == ["heldout", "heldout"]
        assert all(d.split == "train" for d in chapters[:-2])
    for d in corpus.select("heldout", "math"):
        for p in d.text.split("\n\n"):
            assert int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big") % 20 == 0


def test_vendored_austen_matches_provenance() -> None:
    raw = gzip.decompress((REPO / "data" / "austen.txt.gz").read_bytes())
    provenance = (REPO / "data" / "PROVENANCE.md").read_text()
    assert hashlib.sha256(raw).hexdigest() in provenance
    titles = re.findall(r"^<<<NOVEL (.+)>>>$", raw.decode(), flags=re.M)
    assert titles == ["Emma", "Mansfield Park", "Northanger Abbey", "Persuasion", "Pride and Prejudice",
                      "Sense and Sensibility"]  # fmt: skip


def test_prose_documents_are_chapters(corpus: data.Corpus) -> None:
    prose = corpus.select(domain="prose")
    assert len(prose) == 269  # 55 + 48 + 31 + 24 + 61 + 50 chapters
    assert prose[1].name == "Emma/2" and prose[1].text.startswith("CHAPTER II")
    assert "Emma Woodhouse, handsome, clever, and rich" in prose[0].text  # front matter joins chapter 1
    emma_vol2 = next(d for d in prose if d.name == "Emma/19")
    assert emma_vol2.text.startswith("VOLUME II")


def test_split_chapters_on_synthetic_text() -> None:
    text = "TITLE\n\nCHAPTER I\n\none\n\nVOLUME II\n\n\nCHAPTER II\n\ntwo\nChapter 3\nthree"
    assert corpora.split_chapters(text) == [
        "TITLE\n\nCHAPTER I\n\none",
        "VOLUME II\n\n\nCHAPTER II\n\ntwo",
        "Chapter 3\nthree",
    ]


def test_code_is_the_fixed_module_list(corpus: data.Corpus) -> None:
    code = corpus.select(domain="code")
    assert [d.name for d in code] == list(data.STDLIB_MODULES)
    assert list(data.STDLIB_MODULES) == sorted(data.STDLIB_MODULES)
    assert "def " in next(d for d in code if d.name == "argparse").text


def test_missing_stdlib_module_is_named(tmp_path: Path) -> None:
    (tmp_path / "_aix_support.py").write_text("x = 1\n")
    with pytest.raises(data.CorpusError, match=r"'_collections_abc'.*STDLIB_MODULES"):
        corpora.code_documents(tmp_path)


# --- math ---------------------------------------------------------------------------------------------

_STEP = re.compile(r"(-?\d+) ([-+*/]) (-?\d+) = (-?\d+)")


def _check_steps(problem: str) -> int:
    """Re-evaluate every "a op b = c" in the answer; return how many were checked."""
    answer = problem.split("\nA: ")[1]
    n = 0
    for a, op, b, c in _STEP.findall(answer):
        a_, b_, c_ = int(a), int(b), int(c)
        if op == "/":
            expect = a_ / b_
        else:
            expect = a_ + b_ if op == "+" else (a_ - b_ if op == "-" else a_ * b_)
        assert expect == c_, problem
        n += 1
    return n


def test_math_is_seeded_and_leaves_global_rng_alone() -> None:
    state = random.getstate()
    a = list(data.generate_problems(7, 20_000))
    random.seed(999)  # the global RNG must not influence the output
    b = list(data.generate_problems(7, 20_000))
    c = list(data.generate_problems(8, 20_000))
    random.setstate(state)
    assert a == b
    assert a != c
    assert 20_000 <= sum(len(p) + 2 for p in a) < 21_000


def test_math_answers_are_correct() -> None:
    rng = random.Random(3)
    checked = 0
    for kind in data.math_gen.PROBLEM_KINDS:
        for _ in range(200):
            p = data.make_problem(rng, kind)
            assert p.startswith("Q: ") and "\nA: " in p and "The answer is" in p
            checked += _check_steps(p)
            if kind.startswith("linear"):  # substitute the solution into the equation
                m = re.match(r"Q: Solve for (\w): (.+) = (.+)\.\n", p)
                assert m is not None, p
                var, lhs, rhs = m.groups()
                sol = int(p.rsplit("= ", 1)[1].rstrip("."))
                ev = {var: sol}

                def value(side: str, ev: dict = ev, var: str = var) -> int:
                    return eval(re.sub(rf"(\d+){var}", rf"\1*{var}", side), {}, ev)  # noqa: S307

                assert value(lhs) == value(rhs), p
    assert checked > 1500


# --- packing ------------------------------------------------------------------------------------------


def _toy_tokens() -> TokenizedCorpus:
    """Hand-made token ids: doc i holds ids 100*(i+1) + j, j < 3+i, so every token is traceable; EOS is 0."""
    docs = [list(range(100 * (i + 1), 100 * (i + 1) + 3 + i)) for i in range(12)]
    domains = [i % 3 for i in range(12)]
    train = data.packing._split_from_ids(docs, domains, np.uint16)
    held = data.packing._split_from_ids([[5, 6, 7, 8, 9], [3, 4], [2, 2, 2, 2]], [0, 1, 2], np.uint16)
    return TokenizedCorpus({"train": train, "heldout": held}, eos_id=0, vocab_size=2000, key="toy")


def test_packed_batches_shift_and_domains() -> None:
    tokens = _toy_tokens()
    doc_of = {t: i for i in range(12) for t in range(100 * (i + 1), 100 * (i + 1) + 3 + i)}
    pb = data.PackedBatches(tokens, batch_size=2, seq_len=5, seed=0)
    assert pb.batches_per_epoch == ((102 + 12 - 1) // 2) // 5  # 102 tokens + 12 EOS, 2 lanes, T=5
    seen_labels = []
    for _ in range(pb.batches_per_epoch):
        x, y, d = next(pb)
        assert x.shape == y.shape == d.shape == (2, 5) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # labels are the inputs shifted by one
        for tok, dom in zip(x.flatten().tolist(), d.flatten().tolist()):
            if tok != 0:
                assert dom == doc_of[tok] % 3  # a token's domain is its document's
        seen_labels += y.flatten().tolist()
    non_eos = [t for t in seen_labels if t != 0]
    assert len(non_eos) == len(set(non_eos))  # each token is a label at most once per epoch
    assert pb.epoch == 1 and pb.step == 0


def test_packed_batches_mix_documents_and_eos_separates() -> None:
    tokens = _toy_tokens()
    pb = data.PackedBatches(tokens, batch_size=1, seq_len=70, seed=1)
    x, _, d = next(pb)
    row = x[0].tolist()
    # Every EOS is followed by the first token of some document (or ends the window).
    for i, t in enumerate(row[:-1]):
        if t == 0:
            assert row[i + 1] % 100 == 0
    starts = [t for t in row if t % 100 == 0 and t > 0]
    assert starts != sorted(starts)  # shuffled, not corpus order
    assert len(set(d[0].tolist())) == 3
    other = next(data.PackedBatches(tokens, batch_size=1, seq_len=70, seed=2))[0]
    assert not torch.equal(other, x)  # the seed changes the order


def test_resume_gives_exactly_the_next_batches() -> None:
    tokens = _toy_tokens()
    ref = data.PackedBatches(tokens, batch_size=2, seq_len=4, seed=3)
    n = ref.batches_per_epoch + 3  # cross an epoch boundary
    batches = [next(ref) for _ in range(n + 4)]
    run = data.PackedBatches(tokens, batch_size=2, seq_len=4, seed=3)
    for _ in range(n):
        next(run)
    state = run.state_dict()
    resumed = data.PackedBatches(tokens, batch_size=2, seq_len=4, seed=3)
    resumed.load_state_dict(state)
    for expect in batches[n:]:
        for a, b in zip(next(resumed), expect):
            assert torch.equal(a, b)
    wrong = data.PackedBatches(tokens, batch_size=2, seq_len=4, seed=4)
    with pytest.raises(ValueError, match="seed=3"):
        wrong.load_state_dict(state)


def test_heldout_batches_are_fixed_and_per_domain() -> None:
    tokens = _toy_tokens()
    held = data.heldout_batches(tokens, batch_size=2, seq_len=2)
    x, y, d = held["prose"][0]
    assert x.tolist() == [[5, 6], [7, 8]] and y.tolist() == [[6, 7], [8, 9]]
    assert len(held["prose"]) == 1  # "5 6 7 8 9 EOS": the tail shorter than a window is dropped
    held3 = data.heldout_batches(tokens, batch_size=2, seq_len=1)["prose"]
    assert [b[0].shape[0] for b in held3] == [2, 2, 1]  # the last batch may have fewer rows
    assert held3[-1][1].tolist() == [[0]]  # EOS ends the document
    assert held["code"][0][0].tolist() == [[3, 4]] and held["code"][0][1].tolist() == [[4, 0]]
    assert held["code"][0][2].tolist() == [[1, 1]]
    assert held["math"][0][2].unique().tolist() == [2]
    again = data.heldout_batches(tokens, batch_size=2, seq_len=2)
    assert all(torch.equal(a, b) for k in held for ba, bb in zip(held[k], again[k]) for a, b in zip(ba, bb))


def test_unigram_loss_hand_computed() -> None:
    # counts + 1 over V=3: [3, 2, 1] / 6 -> loss on [1, 2] = -(ln(2/6) + ln(1/6)) / 2
    got = data.unigram_loss(np.array([0, 0, 1]), np.array([1, 2]), vocab_size=3)
    assert got == pytest.approx((math.log(3) + math.log(6)) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="vocab_size=3"):
        data.unigram_loss(np.array([0, 3]), np.array([1]), vocab_size=3)


def test_unigram_losses_per_domain() -> None:
    losses = data.unigram_losses(_toy_tokens())
    assert set(losses) == set(data.DOMAINS)
    # math held-out is "2 2 2 2 EOS": id 2 is unseen in train, EOS is frequent.
    train_N = np.array([t for i in range(12) for t in [*range(100 * (i + 1), 100 * (i + 1) + 3 + i), 0]])
    assert losses["math"] == pytest.approx(data.unigram_loss(train_N, np.array([2, 2, 2, 2, 0]), 2000))


def test_split_tokens_stream_matches_python() -> None:
    st = SplitTokens(
        np.array([1, 2, 3, 4, 5, 6], np.uint16), np.array([0, 2, 2, 6]), np.array([0, 1, 2], np.int8)
    )
    ids, dom = st.stream(np.array([2, 0, 1]), eos_id=9)
    assert ids.tolist() == [3, 4, 5, 6, 9, 1, 2, 9, 9]
    assert dom.tolist() == [2, 2, 2, 2, 2, 0, 0, 0, 1]


# --- scripts/extract_austen.py ------------------------------------------------------------------------


def _xdr_strsxp(lines: list[str | None]) -> bytes:
    """An R XDR (version 3) serialisation of a character vector, as in a data package's .rdb block."""
    out = b"X\n" + struct.pack(">iiii", 3, 0x040201, 0x030500, 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(lines))  # STRSXP, length
    for s in lines:
        if s is None:
            out += struct.pack(">ii", 9, -1)  # NA_character_
        else:
            b = s.encode("utf-8")
            out += struct.pack(">ii", 0x00040009, len(b)) + b  # CHARSXP flagged UTF-8
    return out


def test_extract_austen_reads_rdb_blocks(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("extract_austen", REPO / "scripts" / "extract_austen.py")
    assert spec is not None and spec.loader is not None
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    rdb = b""
    for i, key in enumerate(sorted(ex.TITLES)):  # no .rdx: blocks are read in (alphabetical) file order
        payload = _xdr_strsxp([f"{key.upper()}", "", f"line £{i}", None])
        rdb += struct.pack(">I", len(payload)) + zlib.compress(payload)
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    assert ex.main([str(tmp_path / "Rdata.rdb"), "--vendor", str(tmp_path / "a.txt.gz")]) == 0
    novels = corpora.read_austen(tmp_path / "a.txt.gz")
    assert list(novels) == list(ex.TITLES.values())
    assert novels["Emma"] == "EMMA\n\nline £0"  # NA -> "", trailing blank lines stripped
    assert novels["Sense and Sensibility"] == "SENSESENSIBILITY\n\nline £5"
    (tmp_path / "bad.rdb").write_bytes(struct.pack(">I", 99) + zlib.compress(b"X\n"))
    with pytest.raises(ex.RdbError, match="decompressed to 2 bytes, header says 99"):
        ex.read_novels(tmp_path / "bad.rdb")
