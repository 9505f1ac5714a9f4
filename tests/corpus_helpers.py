"""Helpers shared by the tests that train: a small corpus (the first documents of every domain and split)."""

from __future__ import annotations

from widemoe.data import Corpus


def subset(corpus: Corpus, docs_per_group: int) -> Corpus:
    """The first ``docs_per_group`` documents of every (domain, split): a small corpus for tests."""
    seen: dict[tuple[str, str], int] = {}
    keep = []
    for d in corpus.documents:
        n = seen.get((d.domain, d.split), 0)
        if n < docs_per_group:
            keep.append(d)
            seen[(d.domain, d.split)] = n + 1
    return Corpus(tuple(keep))
