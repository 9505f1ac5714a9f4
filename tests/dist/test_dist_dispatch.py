"""The all-to-all dispatcher (expert parallelism) on 2 and 4 gloo ranks against one process."""

from __future__ import annotations

import pytest
from launch import torchrun

SCENARIOS = ("random", "skewed", "sparse", "empty_rank")


@pytest.mark.parametrize("nproc", [2, 4])
def test_all_to_all_dispatch_round_trip_and_gradients(nproc: int) -> None:
    res, out = torchrun("dispatch_roundtrip.py", nproc)
    for s in SCENARIOS:
        assert res[f"{s}/identity_err"] == 0.0, (s, out[-2000:])  # dyadic values: exact
        for k in ("y", "dx", "dw", "dW1", "dW2"):
            assert res[f"{s}/{k}"] <= 1e-6, (s, k, res[f"{s}/{k}"])
    assert res["bytes_sent_positive"] is True
