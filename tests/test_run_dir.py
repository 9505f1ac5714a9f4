"""Run directories: one run per directory (refused without --resume/--fresh), one training at a time
(the lock), resume that states what it does (changed hyperparameters, nothing to resume, a damaged
newest checkpoint)."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from widemoe.hf.resolve import MARKER, committed_checkpoints, latest_checkpoint
from widemoe.train.build import prepare_train_data
from widemoe.train.config import TrainConfig
from widemoe.train.loop import Trainer
from widemoe.train.metrics import read_metrics
from widemoe.train.run_dir import LOCK_FILE, RunDirError, RunLock, RunLocked

torch.set_num_threads(2)


def tc_for(run_dir, **kw):
    base = dict(
        run_dir=str(run_dir), preset="micro", vocab_size=512, seq_len=32, batch_size=4, steps=10,
        warmup_steps=2, eval_every=1000, eval_batches=1, save_every=2, keep_last=3, progress=False,
        lr=3e-3,
    )
    base.update(kw)
    return TrainConfig(**base)


def fit(tc, corpus, cache_dir):
    td = prepare_train_data(tc, corpus, cache_dir)
    trainer = Trainer(tc, td, tokenizer=td.tokenizer)
    trainer.peak_flops = 1e12  # skip the start-up matmul measurement: MFU is not under test here
    trainer.fit()
    return trainer


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, corpus, cache_dir):
    """A run of 10 steps stopped at 6, saved every 2 (checkpoints 2, 4, 6)."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    fit(tc_for(run, stop_at=6), corpus, cache_dir)
    return run


@pytest.fixture
def run(tmp_path, stopped_run):
    dst = tmp_path / "run"
    shutil.copytree(stopped_run, dst)
    return dst


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def steps_of(run_dir):
    return [int(p.name.split("-")[1]) for p in committed_checkpoints(run_dir)]


# --- #2: one run per directory ----------------------------------------------------------------------


def test_new_run_into_a_used_directory_is_refused(run, corpus, cache_dir):
    before = snapshot(run)
    with pytest.raises(RunDirError, match=rf"{run}.*step 6.*--resume.*--fresh"):
        fit(tc_for(run, steps=4, keep_last=2), corpus, cache_dir)
    assert snapshot(run) == before


def test_fresh_starts_over_without_mixing(run, corpus, cache_dir, capsys):
    fit(tc_for(run, steps=4, keep_last=2, fresh=True), corpus, cache_dir)
    assert steps_of(run) == [2, 4]
    assert latest_checkpoint(run).name == "step-00000004"
    kinds = [r["kind"] for r in read_metrics(run / "metrics.jsonl")]
    assert kinds.count("start") == 1 and "resume" not in kinds
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"] == [1, 2, 3, 4]
    assert "--fresh" in capsys.readouterr().err


def test_fresh_and_resume_exclude_each_other(run, corpus, cache_dir):
    with pytest.raises(RunDirError, match="--fresh.*--resume"):
        fit(tc_for(run, fresh=True, resume=True), corpus, cache_dir)


def test_an_empty_directory_is_a_new_run(tmp_path, corpus, cache_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    fit(tc_for(tmp_path / "run", steps=2), corpus, cache_dir)
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "run" / LOCK_FILE).exists()


# --- #3: the lock ------------------------------------------------------------------------------------


def write_lock(run_dir: Path, pid: int, host: str | None = None) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "since": 1.7e9}))
    return path


def test_lock_held_by_a_live_process_is_refused(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE)
    try:
        lock = write_lock(tmp_path / "run", holder.pid)
        before = lock.read_bytes()
        with pytest.raises(RunLocked, match=rf"{holder.pid}.*{socket.gethostname()}.*since"):
            RunLock(tmp_path / "run").acquire()
        assert lock.read_bytes() == before
    finally:
        holder.communicate(b"\n")


def test_training_into_a_locked_directory_is_refused_before_it_changes_anything(run, corpus, cache_dir):
    write_lock(run, os.getpid())
    before = snapshot(run)
    with pytest.raises(RunLocked, match=str(os.getpid())):
        fit(tc_for(run, resume=True), corpus, cache_dir)
    assert snapshot(run) == before


def test_stale_lock_is_taken_over_with_a_notice(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path / "run", dead.pid)
    with RunLock(tmp_path / "run"):
        held = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    assert f"process {dead.pid}" in capsys.readouterr().err


def test_lock_on_another_host_is_refused(tmp_path):
    write_lock(tmp_path / "run", 1, host="elsewhere.example")
    with pytest.raises(RunLocked, match=f"elsewhere.example.*{LOCK_FILE}"):
        RunLock(tmp_path / "run").acquire()


def test_lock_is_released_on_an_exception(tmp_path):
    with pytest.raises(KeyError):
        with RunLock(tmp_path / "run"):
            assert (tmp_path / "run" / LOCK_FILE).exists()
            raise KeyError("boom")
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    with RunLock(tmp_path / "run"):  # and can be taken again
        pass


# --- #5: resume states what it does ------------------------------------------------------------------


def test_resume_with_nothing_to_resume_is_an_error(tmp_path, corpus, cache_dir):
    with pytest.raises(RunDirError, match=rf"nothing to resume.*{tmp_path / 'run'}"):
        fit(tc_for(tmp_path / "run", resume=True), corpus, cache_dir)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_with_steps_below_the_checkpoint_is_an_error(run, corpus, cache_dir):
    before = snapshot(run)
    with pytest.raises(RunDirError, match="checkpoint is at step 6; --steps 4 would train nothing"):
        fit(tc_for(run, steps=4, resume=True), corpus, cache_dir)
    assert snapshot(run) == before


def test_resume_states_a_changed_lr_and_uses_it(run, corpus, cache_dir, capsys):
    trainer = fit(tc_for(run, lr=0.5, resume=True, stop_at=7), corpus, cache_dir)
    err = capsys.readouterr().err
    assert f"resumed from step 6 of {run}" in err
    assert "--lr 0.5 replaces 0.003 from here" in err
    assert trainer.scheduler.base_lrs == [0.5, 0.5]
    rec = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"][-1]
    assert rec["step"] == 7 and rec["lr"] > 0.15  # 0.5 x the schedule's 0.378 at step 7 (0.003 before)


def test_resume_refuses_a_changed_seq_len(run, corpus, cache_dir):
    before = snapshot(run)
    with pytest.raises(RunDirError, match="--seq-len 64.*32.*cannot change"):
        fit(tc_for(run, seq_len=64, resume=True), corpus, cache_dir)
    assert snapshot(run) == before


# --- #8: a damaged newest checkpoint -----------------------------------------------------------------


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda d: (d / "trainer_state.pt").unlink(), "trainer_state.pt.*missing"),
        (lambda d: os.truncate(d / "trainer_state.pt", 100), "trainer_state.pt"),
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
        (lambda d: os.truncate(d / "model.safetensors", 1000), "model.safetensors"),
    ],
)
def test_resume_falls_back_from_a_damaged_newest_checkpoint(run, corpus, cache_dir, capsys, damage, why):
    damage(run / "checkpoints" / "step-00000006")
    trainer = fit(tc_for(run, resume=True, stop_at=5), corpus, cache_dir)
    err = capsys.readouterr().err
    assert re.search(f"step-00000006.*{why}", err), err
    assert "resumed from step 4" in err
    assert trainer.step == 5
    assert latest_checkpoint(run).name == "step-00000005"
    assert (run / "checkpoints" / "step-00000006.damaged").is_dir()  # set aside, not deleted
    for ck in committed_checkpoints(run):
        assert (ck / "trainer_state.pt").is_file()


def test_resume_with_every_checkpoint_damaged_names_the_file(run, corpus, cache_dir):
    for ck in committed_checkpoints(run):
        (ck / "trainer_state.pt").unlink()
    with pytest.raises(RunDirError, match=r"step-00000006.*trainer_state\.pt"):
        fit(tc_for(run, resume=True), corpus, cache_dir)
    assert all((ck / MARKER).exists() for ck in (run / "checkpoints").iterdir())


# --- through the CLI: a message, no traceback --------------------------------------------------------


def test_cli_refuses_a_used_run_dir_with_a_message(run, capsys):
    from widemoe.cli import main

    argv = ["train", "--run-dir", str(run), "--preset", "micro", "--seq-len", "32", "--batch-size", "4",
            "--steps", "4", "--warmup-steps", "1", "--no-progress"]
    before = snapshot(run)
    try:
        code = main(argv)
    except SystemExit as e:  # `error: ...` raised by widemoe.cli.main, or a command's exit status
        code = e.code if isinstance(e.code, int) else 1
        msg = ("" if isinstance(e.code, int) else str(e.code)) + capsys.readouterr().err
    else:
        msg = capsys.readouterr().err
    assert code != 0
    assert "already holds a run" in msg and "Traceback" not in msg and "--fresh" in msg
    assert snapshot(run) == before


def test_resume_of_a_complete_run_says_so_and_changes_nothing(run, corpus, cache_dir, capsys):
    before = {k: v for k, v in snapshot(run).items() if k != "metrics.jsonl"}
    trainer = fit(tc_for(run, steps=6, resume=True), corpus, cache_dir)
    assert trainer.step == 6
    assert "complete at step 6 (--steps 6): nothing to train" in capsys.readouterr().err
    assert {k: v for k, v in snapshot(run).items() if k != "metrics.jsonl"} == before
