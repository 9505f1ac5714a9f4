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
    two = tmp_path / "two"
    _, out = torchrun("-m widemoe", 2, "train", *ARGS, "--ep", "2", "--run-dir", str(two),
                      env={"WIDEMOE_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert out.count("trained 6 steps") == 1  # rank 0 prints
    assert len(records(two, "start")) == 1 and len(records(two, "train")) == 6  # rank 0 writes
    ref = [r["loss"] for r in records(one, "train")]
    got = [r["loss"] for r in records(two, "train")]
    assert max(abs(a - b) for a, b in zip(got, ref, strict=True)) <= 1e-5, (got, ref)
    assert all(r["a2a_bytes_per_rank"] > 0 and r["a2a_seconds"] >= 0 for r in records(two, "train"))
    held = records(two, "eval")[-1]["heldout_loss"]
    assert all(abs(held[d] - v) <= 1e-5 for d, v in records(one, "eval")[-1]["heldout_loss"].items())
    # a DCP checkpoint of 2 ranks: stop at 3 on 2 ranks, resume without torchrun: the same run
    part = tmp_path / "part"
    torchrun("-m widemoe", 2, "train", *ARGS, "--ep", "2", "--stop-at", "3",
             "--run-dir", str(part), env={"WIDEMOE_CACHE": str(tmp_path / "cache")}, timeout=300)
    res = widemoe("train", *ARGS, "--ep", "1", "--resume", "--run-dir", str(part), env=env)
    assert "resumed from step 3" in res.stderr
    cont = [r["loss"] for r in records(part, "train")]
    assert len(cont) == 6 and max(abs(a - b) for a, b in zip(cont, ref, strict=True)) <= 1e-5, (cont, ref)


def test_a_failing_rank_ends_every_rank_with_its_error(tmp_path: Path) -> None:
    t0 = time.monotonic()
    _, out = torchrun("train_crash.py", 2, "train", *ARGS, "--ep", "2", "--run-dir", str(tmp_path / "r"),
                      env={"WIDEMOE_CACHE": str(tmp_path / "cache")}, expect_rc=1, timeout=240)
    assert "injected failure on rank 1 at step 2" in out
    assert time.monotonic() - t0 < 200  # ended by torchrun, not by the collective timeout (300 s)
