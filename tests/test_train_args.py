"""Training options: values that would make training fail or silently wrong are refused in one place
(`TrainConfig`) with the flag, the value and the rule; the vocabulary comes from the model spec unless
--vocab-size is given; a model too large for the memory is refused before anything is allocated; with
stdout not a terminal, progress is a plain line every few seconds."""

import dataclasses
import io
import json
import math
import re
import time

import pytest
import torch

from widemoe.cli import main
from widemoe.train.build import model_config_for, prepare_train_data
from widemoe.train.config import TrainConfig, TrainConfigError
from widemoe.train.eval import evaluate_heldout
from widemoe.train.loop import Trainer
from widemoe.train.progress import TrainProgress

torch.set_num_threads(2)


def run_cli(argv, capsys):
    """(exit status, stderr) of `widemoe argv`, whether `main` returns or raises SystemExit."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def base_args(run_dir):
    return ["train", "--run-dir", str(run_dir), "--preset", "micro", "--vocab-size", "512", "--seq-len", "32",
            "--batch-size", "4", "--steps", "4", "--warmup-steps", "1", "--no-progress"]


BAD_FLAGS = [
    (["--grad-clip", "-1"], r"--grad-clip.*-1.*>= 0"),
    (["--grad-clip", "nan"], r"--grad-clip.*nan.*finite"),
    (["--grad-clip", "inf"], r"--grad-clip.*inf.*finite"),
    (["--eval-batches", "0"], r"--eval-batches.*0.*>= 1"),
    (["--eval-every", "0"], r"--eval-every.*0.*>= 1"),
    (["--steps", "0"], r"--steps.*0.*>= 1"),
    (["--steps", "-3"], r"--steps.*-3.*>= 1"),
    (["--batch-size", "0"], r"--batch-size.*0.*>= 1"),
    (["--seq-len", "0"], r"--seq-len.*0.*>= 1"),
    (["--grad-accum", "0"], r"--grad-accum.*0.*>= 1"),
    (["--lr", "0"], r"--lr.*0.*> 0"),
    (["--lr", "-0.1"], r"--lr.*-0.1.*> 0"),
    (["--lr", "nan"], r"--lr.*nan.*finite"),
    (["--lr", "inf"], r"--lr.*inf.*finite"),
    (["--warmup-steps", "-1"], r"--warmup-steps.*-1.*>= 0"),
    (["--warmup-steps", "5"], r"--warmup-steps.*5.*<=.*--steps.*4"),
    (["--weight-decay", "-0.1"], r"--weight-decay.*-0.1.*>= 0"),
    (["--weight-decay", "nan"], r"--weight-decay.*nan.*finite"),
    (["--save-every", "0"], r"--save-every.*0.*>= 1"),
    (["--keep-last", "0"], r"--keep-last.*0.*>= 1"),
    (["--stop-at", "0"], r"--stop-at.*0.*>= 1"),
    (["--stop-at", "9"], r"--stop-at.*9.*<=.*--steps.*4"),
    (["--seed", "-1"], r"--seed.*-1.*>= 0"),
    (["--bias-update-speed", "-0.01"], r"--bias-update-speed.*-0.01.*> 0"),
    (["--bias-update-speed", "nan"], r"--bias-update-speed.*nan.*finite"),
    (["--bias-update-speed", "0.01", "--balance", "none"], r"--bias-update-speed.*only.*aux-free"),
    (["--vocab-size", "100"], r"vocab.size.*100.*>= 258"),
    (["--seq-len", "200"], r"--seq-len.*200.*max_position_embeddings.*128"),
]


@pytest.mark.parametrize("extra, pattern", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_training_flags_are_refused_before_anything_is_written(tmp_path, capsys, extra, pattern):
    run_dir = tmp_path / "run"
    code, err = run_cli(base_args(run_dir) + extra, capsys)
    assert code == 2  # a usage error (widemoe.commands.errors)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err
    assert not run_dir.exists()


BAD_FIELDS = [
    (dict(min_lr_ratio=1.5), r"min_lr_ratio.*1.5.*\[0, 1\]"),
    (dict(min_lr_ratio=float("nan")), r"min_lr_ratio.*nan.*finite"),
    (dict(betas=(1.0, 0.95)), r"betas.*1.0.*\[0, 1\)"),
    (dict(betas=(0.9,)), r"betas.*two"),
    (dict(log_every=0), r"log_every.*0.*>= 1"),
    (dict(steps="10"), r"steps.*'10'.*integer"),
    (dict(steps=True), r"steps.*True.*integer"),
    (dict(lr="0.1"), r"lr.*'0.1'.*number"),
    (dict(bf16="false"), r"bf16.*'false'.*true or false"),
    (dict(balance="aux"), r"balance.*'aux'.*aux-free"),
    (dict(run_dir=""), r"run_dir.*non-empty"),
    (dict(model_overrides=[1]), r"model_overrides.*dict"),
    (dict(vocab_size=512, model_overrides={"vocab_size": 1024}), r"vocab_size.*512.*1024"),
]


@pytest.mark.parametrize("fields, pattern", BAD_FIELDS, ids=[str(f) for f, _ in BAD_FIELDS])
def test_train_config_validates_every_field(fields, pattern):
    with pytest.raises(TrainConfigError, match=pattern):
        TrainConfig(**fields)
    assert issubclass(TrainConfigError, ValueError)


def test_defaults_and_boundaries_are_accepted():
    TrainConfig()
    TrainConfig(steps=5, warmup_steps=5, stop_at=5, grad_clip=0.0, min_lr_ratio=0.0, betas=[0.9, 0.95])
    assert TrainConfig(grad_clip=0.0).clip_norm == math.inf
    assert TrainConfig(grad_clip=0.5).clip_norm == 0.5


def test_warmup_defaults_to_a_tenth_of_the_steps():
    assert TrainConfig().warmup_steps == 30
    assert TrainConfig(steps=4).warmup_steps == 0
    assert TrainConfig(steps=25).warmup_steps == 2
    assert TrainConfig(steps=25, warmup_steps=25).warmup_steps == 25


def test_grad_clip_zero_means_no_clipping(tmp_path, corpus, cache_dir):
    def losses(name, clip):
        tc = TrainConfig(run_dir=str(tmp_path / name), preset="micro", vocab_size=512, seq_len=32,
                         batch_size=4, steps=3, warmup_steps=0, eval_batches=1, progress=False,
                         grad_clip=clip)
        td = prepare_train_data(tc, corpus, cache_dir)
        trainer = Trainer(tc, td, tokenizer=td.tokenizer)
        return [trainer.train_step()["loss"] for _ in range(2)]

    # clipping to a norm of 0 would zero every gradient (the second loss would differ)
    assert losses("off", 0.0) == losses("huge", 1e12)


def test_eval_never_reports_a_loss_of_no_tokens():
    from widemoe.model.causal_lm import build_model
    from widemoe.presets import get_preset

    model = build_model(get_preset("micro"), seed=0)
    with pytest.raises(ValueError, match="held-out.*prose.*no batches"):
        evaluate_heldout(model, {"prose": []}, False, torch.device("cpu"))


# --- vocabulary: from the model spec unless --vocab-size is given -------------------------------


def write_config(tmp_path, vocab_size):
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"preset": "micro", "vocab_size": vocab_size}))
    return path


def test_config_files_vocab_size_is_used_without_vocab_size_flag(tmp_path, corpus, cache_dir):
    tc = TrainConfig(run_dir=str(tmp_path / "run"), config_file=str(write_config(tmp_path, 300)))
    assert tc.vocab_size is None
    assert model_config_for(tc).vocab_size == 300
    td = prepare_train_data(
        TrainConfig(config_file=tc.config_file, seq_len=32, batch_size=4, eval_batches=1), corpus, cache_dir
    )
    assert td.tokenizer.vocab_size == 300


def test_vocab_size_flag_replaces_the_config_files_and_says_so(tmp_path, capsys, monkeypatch):
    from widemoe.train import build

    cfg = write_config(tmp_path, 300)
    tc = TrainConfig(config_file=str(cfg), vocab_size=512)
    assert model_config_for(tc).vocab_size == 512
    # the note comes before any work; a model that cannot fit (no memory here) stops the run after it
    monkeypatch.setattr(build, "available_memory_bytes", lambda: 1)
    args = ["train", "--run-dir", str(tmp_path / "run"), "--config", str(cfg), "--vocab-size", "512",
            "--seq-len", "32", "--no-progress"]
    code, err = run_cli(args, capsys)
    assert code == 1
    assert re.search(r"--vocab-size 512 replaces vocab_size 300 of .*model.json", err), err


def test_micro_without_vocab_size_says_to_pass_one(tmp_path, capsys):
    args = ["train", "--run-dir", str(tmp_path / "run"), "--preset", "micro", "--seq-len", "32",
            "--no-progress"]
    code, err = run_cli(args, capsys)
    assert code == 2
    assert re.search(r"micro.*vocab_size 256.*>= 258.*--vocab-size", err), err
    assert not (tmp_path / "run").exists()
    code, err = run_cli(args[:-2] + ["200", "--no-progress"], capsys)  # a flag's own error comes first
    assert code == 2 and re.search(r"--seq-len.*200.*max_position_embeddings 128", err), err


# --- memory guard ---------------------------------------------------------------------------------


def test_full_size_preset_is_refused_fast_with_the_numbers(tmp_path, capsys):
    t0 = time.perf_counter()
    code, err = run_cli(["train", "--run-dir", str(tmp_path / "run"), "--preset", "deepseek-v3",
                         "--seq-len", "64", "--no-progress"], capsys)
    assert time.perf_counter() - t0 < 10
    assert code == 1  # a failure: the model does not fit
    assert re.search(
        r"deepseek-v3: ~10\.\d+ TB for parameters, gradients and AdamW state.*GB available", err
    ), err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_memory_guard_uses_the_available_memory(tmp_path, monkeypatch):
    from widemoe.train import build

    monkeypatch.setattr(build, "available_memory_bytes", lambda: 1_000_000)
    tc = TrainConfig(run_dir=str(tmp_path / "run"), preset="micro", vocab_size=512, seq_len=32)
    with pytest.raises(build.TrainMemoryError, match=r"micro: ~\d.* MB for parameters.*1\.00 MB available"):
        build.check_trainable(tc, model_config_for(tc), torch.device("cpu"))


# --- progress without a terminal ------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def rec(step, loss=2.5):
    return {"loss": loss, "max_vio_mean": 0.5, "tokens_per_s": 1000.0, "tokens": step * 1000}


def test_plain_progress_line_every_interval_when_not_a_terminal():
    out, clock = io.StringIO(), FakeClock()
    with TrainProgress(True, total=10, start=0, interval=5.0, stream=out, clock=clock, terminal=False) as bar:
        for step in range(1, 11):
            clock.now += 2.0  # 2 s per step of 1000 tokens
            bar(step, rec(step))
    lines = out.getvalue().splitlines()
    assert [ln.split()[1] for ln in lines] == ["3/10", "6/10", "9/10"]
    assert re.fullmatch(r"step 3/10 +loss 2\.500 +MaxVio 0\.50 +500 tok/s +ETA 0:00:14", lines[0]), lines[0]


def test_plain_progress_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv("WIDEMOE_PROGRESS_INTERVAL", "0")
    out, clock = io.StringIO(), FakeClock()
    with TrainProgress(True, total=3, start=1, stream=out, clock=clock, terminal=False) as bar:
        for step in (2, 3):
            clock.now += 1.0
            bar(step, rec(step))
    assert [ln.split()[1] for ln in out.getvalue().splitlines()] == ["2/3", "3/3"]
    with TrainProgress(False, total=3, start=0, stream=out, clock=clock, terminal=False) as bar:
        bar(1, rec(1))
    assert len(out.getvalue().splitlines()) == 2  # disabled: nothing


def test_bad_progress_interval_is_named(monkeypatch):
    monkeypatch.setenv("WIDEMOE_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="WIDEMOE_PROGRESS_INTERVAL.*'soon'"):
        with TrainProgress(True, total=3, start=0, stream=io.StringIO(), terminal=False):
            pass


def test_train_redirected_prints_progress_lines(tmp_path, corpus, cache_dir, capsys, monkeypatch):
    from widemoe.train.run import run_training, run_vocab_size

    monkeypatch.setenv("WIDEMOE_PROGRESS_INTERVAL", "0")
    tc = TrainConfig(run_dir=str(tmp_path / "run"), preset="micro", vocab_size=512, seq_len=32, batch_size=4,
                     steps=2, warmup_steps=1, eval_every=2, eval_batches=1, save_every=2, progress=True)
    run_training(tc, corpus=corpus, cache_dir=cache_dir)
    out = capsys.readouterr().out
    assert re.search(r"^step 1/2 .*tok/s.*ETA", out, re.M) and re.search(r"^step 2/2 ", out, re.M), out
    # resuming without --vocab-size keeps the run's vocabulary (not micro's 256)
    assert run_vocab_size(tc.run_dir) == 512
    again = dataclasses.replace(tc, vocab_size=None, resume=True, steps=3, progress=False)
    result = run_training(again, corpus=corpus, cache_dir=cache_dir)
    assert result["trainer"].config.vocab_size == 512 and result["steps"] == 3
