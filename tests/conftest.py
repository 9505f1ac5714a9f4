"""Fixtures shared by the training tests (test_train, test_run_dir, test_train_args): a small corpus and
a tokenizer/token-id cache, built once per module."""

from __future__ import annotations

import pytest

import widemoe.data as wdata
from corpus_helpers import subset


@pytest.fixture(scope="module")
def corpus():
    return subset(wdata.build_corpus(math_chars=60_000), 12)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")
