"""Training: the loss falls, resume is exact, a kill during a save loses nothing, the NaN guard, balancing."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from widemoe.hf.resolve import committed_checkpoints, latest_checkpoint
from widemoe.train.build import prepare_train_data
from widemoe.train.config import TrainConfig, TrainingStopped
from widemoe.train.loop import Trainer
from widemoe.train.metrics import read_metrics
from widemoe.train.step import autocast_for

torch.set_num_threads(2)


def tc_for(run_dir, **kw):
    base = dict(
        run_dir=str(run_dir),
        preset="micro",
        vocab_size=512,
        seq_len=32,
        batch_size=4,
        steps=6,
        warmup_steps=2,
        eval_every=1000,
        eval_batches=1,
        save_every=1000,
        progress=False,
        lr=3e-3,
    )
    base.update(kw)
    return TrainConfig(**base)


def make_trainer(tc, corpus, cache_dir):
    td = prepare_train_data(tc, corpus, cache_dir)
    return Trainer(tc, td, tokenizer=td.tokenizer)


def train_losses(run_dir):
    return [r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train"]


def test_micro_run_lowers_the_loss(tmp_path, corpus, cache_dir):
    tc = tc_for(tmp_path / "run", steps=40, warmup_steps=4, eval_every=40)
    result = make_trainer(tc, corpus, cache_dir).fit()
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    ev = result["final_eval"]
    assert set(ev["heldout_loss"]) == {"prose", "code", "math"}
    assert latest_checkpoint(tmp_path / "run").name == "step-00000040"


def test_resume_is_exact(tmp_path, corpus, cache_dir):
    straight = make_trainer(tc_for(tmp_path / "a", steps=6, grad_accum=2), corpus, cache_dir)
    straight.fit()
    half = make_trainer(tc_for(tmp_path / "b", steps=6, stop_at=3, grad_accum=2), corpus, cache_dir)
    half.fit()
    resumed = make_trainer(tc_for(tmp_path / "b", steps=6, grad_accum=2, resume=True), corpus, cache_dir)
    resumed.fit()
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_guard_saves_last_good_step_and_stops(tmp_path, corpus, cache_dir):
    trainer = make_trainer(tc_for(tmp_path / "run", steps=10), corpus, cache_dir)
    calls = {"n": 0}

    def poison(_module, _inp, out):
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 4 else out  # step 4 (one final norm per step)

    trainer.model.model.norm.register_forward_hook(poison)
    with pytest.raises(TrainingStopped, match="non-finite loss at step 4.*step 3.*saved"):
        trainer.fit()
    latest = latest_checkpoint(tmp_path / "run")
    assert latest is not None and latest.name == "step-00000003"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]["kind"] == "stopped"


KILL_SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])  # the tests directory, for corpus_helpers
from corpus_helpers import subset
from widemoe import data as wdata
from widemoe.train import checkpoint as ckpt
from widemoe.train.build import prepare_train_data
from widemoe.train.config import TrainConfig
from widemoe.train.loop import Trainer

run_dir, cache_dir, flag = sys.argv[1], sys.argv[2], Path(sys.argv[3])
tc = TrainConfig(run_dir=run_dir, preset="micro", vocab_size=512, seq_len=32, batch_size=4, steps=4,
                 warmup_steps=1, eval_every=1000, eval_batches=1, save_every=2, progress=False)
td = prepare_train_data(tc, subset(wdata.build_corpus(math_chars=60_000), 12), cache_dir)
trainer = Trainer(tc, td, tokenizer=td.tokenizer)
real_save = ckpt.save_checkpoint

def hanging_save(*args, **kw):
    if trainer.step == 4:  # the second save: stop between the rename and the commit marker
        def hang(_path):
            flag.write_text("saving")
            while True:
                time.sleep(0.05)
        kw["before_commit"] = hang
    return real_save(*args, **kw)

ckpt.save_checkpoint = hanging_save
trainer.fit()
"""


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path, corpus, cache_dir):
    run_dir, flag = tmp_path / "run", tmp_path / "flag"
    tests_dir = Path(__file__).parent
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(run_dir), str(cache_dir), str(flag), str(tests_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not flag.exists():  # wait for the child to reach the save; not a timing assumption
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "child never reached the second save"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The half-written step-4 directory exists but is not committed: the newest good one is step 2.
    assert (run_dir / "checkpoints" / "step-00000004").is_dir()
    assert latest_checkpoint(run_dir).name == "step-00000002"
    from widemoe.hf import load_pretrained

    load_pretrained(latest_checkpoint(run_dir))
    resumed = make_trainer(tc_for(run_dir, steps=4, save_every=2, resume=True), corpus, cache_dir)
    resumed.fit()
    assert resumed.step == 4
    assert latest_checkpoint(run_dir).name == "step-00000004"
    kinds = [r["kind"] for r in read_metrics(run_dir / "metrics.jsonl")]
    assert "resume" in kinds


def test_retention_keeps_newest(tmp_path, corpus, cache_dir):
    make_trainer(tc_for(tmp_path / "run", steps=5, save_every=1, keep_last=2), corpus, cache_dir).fit()
    names = [p.name for p in committed_checkpoints(tmp_path / "run")]
    assert names == ["step-00000004", "step-00000005"]


def test_aux_free_balancing_lowers_max_vio_against_none(tmp_path, corpus, cache_dir):
    def final_max_vio(balance):
        speed = 0.02 if balance == "aux-free" else None  # the bias speed applies to aux-free only
        tc = tc_for(tmp_path / balance, steps=40, balance=balance, bias_update_speed=speed, lr=1e-3)
        recs = [r for r in read_metrics_after(make_trainer(tc, corpus, cache_dir)) if r["kind"] == "train"]
        return sum(r["max_vio_mean"] for r in recs[-10:]) / 10

    def read_metrics_after(trainer):
        trainer.fit()
        return read_metrics(Path(trainer.tc.run_dir) / "metrics.jsonl")

    assert final_max_vio("aux-free") < final_max_vio("none")


def test_parallelize_runs_between_the_model_and_the_optimizer(tmp_path, corpus, cache_dir):
    seen = {}

    def parallelize_fn(model, mesh):
        # as FSDP2 does: parameters replaced by new ones (here: copies), which the optimizer must hold
        seen["mesh"] = mesh
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        seen["param"] = model.lm_head.weight
        return model

    tc = tc_for(tmp_path / "run")
    td = prepare_train_data(tc, corpus, cache_dir)
    trainer = Trainer(tc, td, tokenizer=td.tokenizer, mesh="a mesh", parallelize_fn=parallelize_fn)
    assert seen["mesh"] == "a mesh" and trainer.model.lm_head.weight is seen["param"]
    held = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert any(p is seen["param"] for p in held)


def test_autocast_follows_the_device_and_the_flag():
    a = torch.randn(4, 4)
    with autocast_for(torch.device("cpu"), True):
        assert (a @ a).dtype == torch.bfloat16
    with autocast_for(torch.device("cpu"), False):
        assert (a @ a).dtype == torch.float32


def test_retention_interrupted_after_the_marker_leaves_nothing_marked_incomplete(tmp_path, monkeypatch):
    # A kill in the middle of deleting an old checkpoint must not leave it COMMITTED without its state.
    from widemoe.hf.resolve import MARKER
    from widemoe.train import checkpoint as ckpt

    def write_model(d):
        (d / "config.json").write_text("{}")

    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, write_model, {"step": step}, keep_last=2)

    class Killed(BaseException):
        pass

    def killed_rmtree(path, ignore_errors=False):
        (Path(path) / ckpt.STATE_FILE).unlink()  # the state goes first, then the process dies
        raise Killed

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_rmtree)
    with pytest.raises(Killed):
        ckpt.save_checkpoint(tmp_path, 3, write_model, {"step": 3}, keep_last=2)
    for d in committed_checkpoints(tmp_path):
        assert (d / ckpt.STATE_FILE).is_file(), d
    assert (tmp_path / "checkpoints" / "step-00000001").is_dir()  # the interrupted one: not committed
    assert not (tmp_path / "checkpoints" / "step-00000001" / MARKER).exists()
    assert [p.name for p in committed_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
