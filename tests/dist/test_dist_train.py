"""`widemoe train` under torchrun: the same losses as one process on the same global batch, rank 0 alone
writes and prints, a run saved on 2 ranks resumes in one process, and a failing rank ends the launch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from launch import torchrun

ARGS = ["--preset", "micro", "--vocab-size", "512", "--seq-len", "32", "--batch-size", "4", "--steps", "6",
        "--warmup-steps", "1", "--eval-every", "3", "--save-every", "3", "--eval-batches", "1",
        "--no-progress"]


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def widemoe(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "widemoe", *argv], capture_output=True, text=True,
                          timeout=300, env=env, check=True)


def test_two_ranks_train_like_one_and_resume_in_one(tmp_path: Path) -> None:
    env = {**os.environ, "WIDEMOE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "WIDEMOE_THREADS": "1"}
    one = tmp_path / "one"
    widemoe("train", *ARGS, "--run-dir", str(one), env=env)  # also fills the tokenizer cache
    ref = [r["loss"] for r in records(one, "train")]
    # steps 1-3 on 2 ranks (EP 2, a DCP checkpoint at step 3), then steps 4-6 in one process from it
    two = tmp_path / "two"
    _, out = torchrun("-m widemoe", 2, "train", *ARGS, "--ep", "2", "--stop-at", "3", "--run-dir", str(two),
                      env={"WIDEMOE_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert out.count("trained 3 steps") == 1  # rank 0 prints
    assert len(records(two, "start")) == 1 and len(records(two, "train")) == 3  # rank 0 writes
    assert all(r["a2a_bytes_per_rank"] > 0 and r["a2a_seconds"] >= 0 for r in records(two, "train"))
    held = records(two, "eval")[-1]["heldout_loss"]
    assert all(abs(held[d] - v) <= 1e-5 for d, v in records(one, "eval")[0]["heldout_loss"].items())
    res = widemoe("train", *ARGS, "--ep", "1", "--resume", "--run-dir", str(two), env=env)
    assert "resumed from step 3" in res.stderr
    got = [r["loss"] for r in records(two, "train")]
    assert len(got) == 6 and max(abs(a - b) for a, b in zip(got, ref, strict=True)) <= 1e-5, (got, ref)


def test_a_failing_rank_ends_every_rank_with_its_error(tmp_path: Path) -> None:
    t0 = time.monotonic()
    _, out = torchrun("train_crash.py", 2, "train", *ARGS, "--ep", "2", "--run-dir", str(tmp_path / "r"),
                      env={"WIDEMOE_CACHE": str(tmp_path / "cache")}, expect_rc=1, timeout=240)
    assert "injected failure on rank 1 at step 2" in out
    assert time.monotonic() - t0 < 200  # ended by torchrun, not by the collective timeout (300 s)
