"""Regenerate the jsonl data of widemoe's lm-eval tasks (src/widemoe/evals/data/*.jsonl) from the repository's
own corpus, deterministically: the same repository and Python version give the same bytes.

Every example comes from the corpus's HELD-OUT split as `widemoe.data.corpora` defines it, which the trainer
never trains on (it only evaluates its held-out loss there):

- widemoe_austen_cloze: sentences of the held-out Austen chapters (the last PROSE_HELDOUT_CHAPTERS
  chapters of each novel). Context: the previous sentence of the paragraph and the first half of a sentence;
  choices: its true second half and the second halves of three other held-out sentences of similar length.
- widemoe_austen_word_order: the same contexts; choices: the true second half and three shuffles of its
  own words (same words and bytes, so only word order separates them: a syntax probe that moves early in
  training, where the semantic cloze above needs a better model).
- widemoe_code_next_line: lines of the held-out stdlib modules (CODE_HELDOUT). Context: up to
  CODE_CONTEXT_LINES lines; choices: the true next line and three lines of held-out modules with the same
  indentation (so whitespace gives nothing away).
- widemoe_arithmetic: math_gen's "arithmetic" problems from seeds the corpus does not use, kept only when the
  corpus's own held-out rule (sha256 of the text = 0 mod MATH_HELDOUT_MOD) sends them to the held-out split,
  so no problem text can be in the training split whatever its seed; checked against the demo corpus too.

    python scripts/make_eval_tasks.py [--check]   # --check: fail if the committed files differ
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import re
import sys
import tokenize
from pathlib import Path

from widemoe.data.corpora import MATH_HELDOUT_MOD, code_documents, math_documents, prose_documents
from widemoe.data.math_gen import make_problem

OUT = Path(__file__).resolve().parents[1] / "src" / "widemoe" / "evals" / "data"
N_EXAMPLES = 120  # per task: stderr about 0.04 on an accuracy, and `make eval` stays within minutes
N_CHOICES = 4
CODE_CONTEXT_LINES = 6
# A sentence ends at . ! ? (a closing quote stays with it) before a capital or a quote, except after the
# titles Austen abbreviates ("Mrs. Jennings").
_SENTENCE_END = re.compile(r"(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bCol\.)"
                           r"(?:(?<=[.!?])|(?<=[.!?][\"']))\s+(?=[\"'A-Z])")


# --- prose --------------------------------------------------------------------------------------------


def held_out_sentences() -> list[tuple[str, str]]:
    """(previous sentence or "", sentence) pairs from the held-out chapters, paragraphs unwrapped."""
    pairs: list[tuple[str, str]] = []
    for doc in prose_documents():
        if doc.split != "heldout":
            continue
        for para in re.split(r"\n\s*\n", doc.text):
            text = " ".join(para.split())
            sentences = [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]
            pairs += [(sentences[i - 1] if i else "", s) for i, s in enumerate(sentences)]
    return pairs


def cloze_items(rng: random.Random) -> list[tuple[str, str]]:
    """(context, true continuation) pairs: the previous sentence and the first half of a held-out sentence
    of 12 to 40 words, then its second half (with its leading space), shuffled."""
    items = []
    for prev, sent in held_out_sentences():
        words = sent.split(" ")
        if not 12 <= len(words) <= 40 or len(prev) > 300:
            continue
        cut = len(words) // 2
        context = (prev + " " if prev else "") + " ".join(words[:cut])
        items.append((context, " " + " ".join(words[cut:])))
    rng.shuffle(items)
    return items


def austen_cloze(rng: random.Random) -> list[dict]:
    """Distractors: second halves of other held-out sentences of similar length (a semantic choice)."""
    items = cloze_items(rng)
    pool = [cont for _, cont in items]
    return [_choice_doc(rng, ctx, cont, pool, lambda c, true=cont: 0.7 <= len(c) / len(true) <= 1.4)
            for ctx, cont in items[:N_EXAMPLES]]


def austen_word_order(rng: random.Random) -> list[dict]:
    """Distractors: the true second half's own words in shuffled orders (same words, same bytes: only word
    order, i.e. syntax, tells them apart)."""
    out = []
    for ctx, cont in cloze_items(rng):
        words = cont[1:].split(" ")
        orders = {" ".join(rng.sample(words, len(words))) for _ in range(20)} - {cont[1:]}
        if len(orders) >= N_CHOICES - 1:
            pool = sorted(orders)
            out.append(_choice_doc(rng, ctx, cont, [" " + o for o in pool], lambda c: True))
        if len(out) == N_EXAMPLES:
            break
    return out


# --- code ---------------------------------------------------------------------------------------------


def string_lines(text: str) -> set[int]:
    """1-based numbers of the lines inside a multi-line string (docstrings): their next line is prose."""
    inside: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.STRING and tok.end[0] > tok.start[0]:
            inside.update(range(tok.start[0] + 1, tok.end[0] + 1))
    return inside


def _is_candidate(line: str) -> bool:
    s = line.strip()
    return 12 <= len(s) <= 80 and not s.startswith("#")


def code_next_line(rng: random.Random) -> list[dict]:
    examples: list[tuple[str, str]] = []
    by_indent: dict[str, list[str]] = {}
    for doc in code_documents():
        if doc.split != "heldout":
            continue
        lines = doc.text.split("\n")
        skip = string_lines(doc.text)
        for i, line in enumerate(lines):
            if i < CODE_CONTEXT_LINES or (i + 1) in skip or not _is_candidate(line):
                continue
            indent = line[: len(line) - len(line.lstrip())]
            by_indent.setdefault(indent, []).append(line)
            context = "\n".join(lines[i - CODE_CONTEXT_LINES : i]) + "\n"
            if context.strip():
                examples.append((context, line))
    rng.shuffle(examples)
    out = []
    for context, line in examples:
        indent = line[: len(line) - len(line.lstrip())]
        if len(set(by_indent[indent])) > 20:  # enough same-indent lines to draw three distinct from
            out.append(_choice_doc(rng, context, line, by_indent[indent], lambda c: True))
        if len(out) == N_EXAMPLES:
            break
    return out


def _choice_doc(rng: random.Random, context: str, true: str, pool: list[str], similar) -> dict:
    """A multiple-choice doc: the true continuation at a random position among N_CHOICES - 1 distractors."""
    distractors: list[str] = []
    while len(distractors) < N_CHOICES - 1:
        c = rng.choice(pool)
        if c != true and c not in distractors and similar(c):
            distractors.append(c)
    label = rng.randrange(N_CHOICES)
    choices = distractors[:label] + [true] + distractors[label:]
    return {"context": context, "choices": choices, "label": label}


# --- math ---------------------------------------------------------------------------------------------

ARITH_SEED = 20_240_613  # not the corpus's math_seed (1234); the held-out rule below is what guarantees it


def held_out_bucket(problem: str) -> bool:
    """The corpus's rule (widemoe.data.corpora.math_documents): the held-out split holds these texts."""
    return int.from_bytes(hashlib.sha256(problem.encode()).digest()[:8], "big") % MATH_HELDOUT_MOD == 0


def arithmetic(rng: random.Random) -> list[dict]:
    train = {p for d in math_documents(1234, 2_500_000) if d.split == "train" for p in d.text.split("\n\n")}
    seen: set[str] = set()
    out = []
    while len(out) < N_EXAMPLES:
        p = make_problem(rng, "arithmetic")
        if p in seen or not held_out_bucket(p):
            continue
        if p in train:
            raise AssertionError(f"held-out rule broken: {p!r} is in the training split")
        seen.add(p)
        question, answer = p.split("\nA: ")
        out.append({"question": question.removeprefix("Q: "), "answer": answer})
    return out


# --- files --------------------------------------------------------------------------------------------

TASKS = {
    "widemoe_austen_cloze": austen_cloze,
    "widemoe_austen_word_order": austen_word_order,
    "widemoe_code_next_line": code_next_line,
    "widemoe_arithmetic": arithmetic,
}


def render(docs: list[dict]) -> str:
    return "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed files, write nothing"
    )
    args = parser.parse_args(argv)
    stale = []
    for name, make in TASKS.items():
        text = render(make(random.Random(name)))  # a str seed is hashed with sha512: stable
        path = OUT / f"{name}.jsonl"
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
            continue
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} ({text.count(chr(10))} examples, {len(text.encode()) / 1e3:.0f} kB)")
    if stale:
        print("differs from the generator: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
