"""The suite runner of `widemoe experiment` (issue 14): the executed run order is seed by seed, an
interrupted suite resumes (between runs and inside one) to the results an uninterrupted suite gives, the
output directory refuses another suite, the result records, the command, and --jobs 2.

A micro suite (3 layers, seq_len 32, 4 steps, one held-out batch per domain): a run trains in about a
second. One uninterrupted suite (`reference`, 2 arms x 2 seeds) is the oracle the other tests compare
with: CPU training with one torch thread is deterministic, so held-out losses must be exactly equal.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from widemoe.experiment.metrics import run_metrics
from widemoe.experiment.runner import SMOKE_LABEL, result_path, run_dir_of, run_suite, train_run
from widemoe.experiment.suite import Run, SuiteError, load_suite
from widemoe.hf.resolve import latest_checkpoint
from widemoe.train.metrics import read_metrics

SUITE = """
[suite]
name = "micro-suite"
preset = "micro"
steps = 4
seq_len = 32
batch_size = 4
vocab_size = 512
eval_every = 2
save_every = 2
eval_batches = 1
final_eval_batches = 1  # the whole held-out set would take ~25 s per run

[suite.model]
num_nextn_predict_layers = 0

[quick]
steps = 2
seeds = 1

[[arm]]
name = "moe"
seeds = 2

[[arm]]
name = "dense"
seeds = 2
model = { first_k_dense_replace = 3 }  # micro has 3 layers: all dense
"""
ORDER = ["moe-s0", "dense-s0", "moe-s1", "dense-s1"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for every training here (the command sets threads too): results then compare
    exactly, whatever OMP_NUM_THREADS the test process has."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("suite") / "micro.toml"
    p.write_text(textwrap.dedent(SUITE))
    return p


@pytest.fixture(scope="module")
def reference(suite_file: Path, tmp_path_factory) -> dict[str, Any]:
    """The uninterrupted suite: its directory, result records (by run id) and notify lines."""
    out = tmp_path_factory.mktemp("reference") / "out"
    lines: list[str] = []
    results = run_suite(load_suite(suite_file), out, notify=lines.append)
    return {"out": out, "results": {r["run_id"]: r for r in results}, "lines": lines}


def progress_ids(lines: list[str]) -> list[str]:
    """The run ids of the progress lines ("[2/4] dense-s0: held-out loss ...") in the order said."""
    return [m.group(1) for m in (re.match(r"\[\d+/\d+\] (\S+):", line) for line in lines) if m]


def run_of(run_id: str) -> Run:
    arm, seed = run_id.rsplit("-s", 1)
    return Run(arm, int(seed))


def snapshot(paths: list[Path]) -> dict[Path, tuple[bytes, int]]:
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


def assert_same_heldout(results: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    for r in results:
        ref = reference["results"][r["run_id"]]["metrics"]
        assert r["metrics"]["heldout_loss"] == ref["heldout_loss"], r["run_id"]
        assert r["metrics"]["heldout_loss_by_domain"] == ref["heldout_loss_by_domain"], r["run_id"]


# --- order and records -------------------------------------------------------------------------------


def test_runs_execute_seed_by_seed(reference):
    out = reference["out"]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["runs"] == ORDER and plan["quick"] is False and plan["suite"] == "micro-suite"
    assert progress_ids(reference["lines"]) == ORDER  # one line per run, as each finished
    assert [line[:5] for line in reference["lines"][1:]] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    mtimes = [result_path(out, run_of(rid)).stat().st_mtime_ns for rid in ORDER]
    assert mtimes == sorted(mtimes) and len(set(mtimes)) == 4  # written in that order too
    assert (out / "suite.toml").read_text() == textwrap.dedent(SUITE)  # the suite as run


def test_result_records(reference):
    out, results = reference["out"], reference["results"]
    assert list(results) == ORDER
    for rid, r in results.items():
        run = run_of(rid)
        assert (r["arm"], r["seed"], r["suite"], r["quick"]) == (run.arm, run.seed, "micro-suite", False)
        assert re.fullmatch(r"[0-9a-f]{40}", r["commit"]) and isinstance(r["dirty"], bool)
        assert r["train_config"]["seed"] == run.seed and r["train_config"]["steps"] == 4
        assert r["train_config"]["run_dir"] == str(run_dir_of(out, run))
        assert r["model_config"]["num_nextn_predict_layers"] == 0
        m = r["metrics"]
        by_domain = m["heldout_loss_by_domain"]
        assert len(by_domain) >= 2 and m["heldout_loss"] == sum(by_domain.values()) / len(by_domain)
        assert m["tokens_per_s"] > 0 and m["train_seconds"] > 0
        assert [c["step"] for c in r["curves"]["train"]] == [1, 2, 3, 4]
        assert [c["step"] for c in r["curves"]["eval"]] == [2, 4]
        assert all(c["heldout_loss"] > 0 for c in r["curves"]["eval"])
        dense = run.arm == "dense"
        assert r["model_config"]["first_k_dense_replace"] == (3 if dense else 1)
        for key in ("maxvio_batch", "maxvio_global", "dead_experts", "mi_bits"):
            assert (m[key] is None) == dense, (rid, key)  # no routing in a dense model
        if not dense:
            assert m["maxvio_batch"] >= 0 and m["maxvio_global"] >= 0 and m["mi_bits"] >= 0
            assert isinstance(m["dead_experts"], int)
        assert not (run_dir_of(out, run) / "checkpoints").exists()  # deleted once recorded
        assert (run_dir_of(out, run) / "metrics.jsonl").is_file()


# --- resuming --------------------------------------------------------------------------------------


def test_resume_after_an_interruption_between_runs(suite_file, reference, tmp_path):
    suite, out = load_suite(suite_file), tmp_path / "out"

    def stop_at_second(message: str) -> None:
        if message.startswith("[2/"):
            raise KeyboardInterrupt  # Ctrl-C right after the second run was recorded

    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, out, notify=stop_at_second)
    done = [result_path(out, Run("moe", 0)), result_path(out, Run("dense", 0))]
    assert sorted((out / "results").iterdir()) == sorted(done)
    before = snapshot(done + [run_dir_of(out, Run("moe", 0)) / "metrics.jsonl"])
    lines: list[str] = []
    results = run_suite(suite, out, notify=lines.append)
    assert "2 already recorded, 2 to train" in lines[0]
    assert progress_ids(lines) == ["moe-s1", "dense-s1"]  # the recorded runs are not trained again
    assert snapshot(list(before)) == before
    assert [r["run_id"] for r in results] == ORDER
    assert_same_heldout(results, reference)


def test_resume_inside_a_run_and_restart_of_a_partial_one(suite_file, reference, tmp_path):
    suite, out = load_suite(suite_file), tmp_path / "out"
    moe, dense = Run("moe", 0), Run("dense", 0)
    assert train_run(suite, moe, out, stop_at=3) is None  # stopped: no result, a checkpoint at step 3
    assert not result_path(out, moe).exists() and latest_checkpoint(run_dir_of(out, moe)).name.endswith("3")
    # a run killed before its first checkpoint: the start of a metrics.jsonl, a torn line, no checkpoint
    head = (run_dir_of(reference["out"], dense) / "metrics.jsonl").read_text().splitlines()[:2]
    run_dir_of(out, dense).mkdir(parents=True)
    (run_dir_of(out, dense) / "metrics.jsonl").write_text("\n".join(head) + '\n{"kind": "tra')
    results = run_suite(suite, out, seeds=1, keep_checkpoints=True, notify=lambda m: None)
    assert [r["run_id"] for r in results] == ["moe-s0", "dense-s0"]
    assert_same_heldout(results, reference)
    moe_records = read_metrics(run_dir_of(out, moe) / "metrics.jsonl")
    assert [r["kind"] for r in moe_records].count("start") == 1
    assert [r["step"] for r in moe_records if r["kind"] == "resume"] == [3]  # continued, not restarted
    dense_records = read_metrics(run_dir_of(out, dense) / "metrics.jsonl")
    assert [r["kind"] for r in dense_records].count("start") == 1  # started over: the old file is gone
    assert [r["step"] for r in dense_records if r["kind"] == "train"] == [1, 2, 3, 4]
    for run in (moe, dense):  # keep_checkpoints: the final checkpoint stays
        assert latest_checkpoint(run_dir_of(out, run)).name.endswith("4")


def test_resume_after_a_crash_past_the_last_checkpoint(suite_file, reference, tmp_path, monkeypatch):
    """Killed during step 4 (checkpoint at step 2, step 3 already logged): the resumed run redoes step 3
    from the checkpoint, data position included, and ends where the uninterrupted run ended."""
    from widemoe.train.loop import Trainer

    suite, out, run = load_suite(suite_file), tmp_path / "out", Run("moe", 1)
    train_step = Trainer.train_step

    def crash_at_step_4(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return train_step(self)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_run(suite, run, out)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    assert latest_checkpoint(run_dir_of(out, run)).name.endswith("2")
    record = train_run(suite, run, out)
    assert record is not None and json.loads(result_path(out, run).read_text())["run_id"] == "moe-s1"
    assert_same_heldout([record], reference)


def test_run_metrics_drop_what_a_resumed_run_redid():
    def train(step: int) -> dict[str, Any]:
        return {"kind": "train", "step": step, "loss": 5.0, "tokens_per_s": 100.0, "step_time": 1.0}

    records = [{"kind": "start"}, train(1), train(2), {"kind": "eval", "step": 2, "tokens": 256,
               "heldout_loss": {"prose": 5.0}}, train(3), {"kind": "resume", "step": 2}, train(3), train(4)]
    final = {"heldout_loss": {"prose": 4.0}, "heldout_max_vio": {}, "heldout_max_vio_mean": 0.0,
             "heldout_dead_experts": {}, "domain_expert_counts": {}}
    m = run_metrics(records, final, 4)
    assert [c["step"] for c in m["curves"]["train"]] == [1, 2, 3, 4]
    assert m["metrics"]["train_seconds"] == 4.0


def test_another_suite_against_a_used_directory_is_refused(suite_file, reference, tmp_path):
    out = reference["out"]
    plan = (out / "plan.json").read_bytes()
    other = tmp_path / "other.toml"  # the same runs, another setting: only the file's text differs
    other.write_text(suite_file.read_text().replace("steps = 4\n", "steps = 4\nlr = 0.002\n", 1))
    suite = load_suite(suite_file)
    attempts = [(load_suite(other), None), (suite.quick(), None), (suite, 1)]
    for variant, seeds in attempts:
        with pytest.raises(SuiteError, match=re.escape(str(out))) as e:
            run_suite(variant, out, seeds=seeds, notify=lambda m: None)
        assert "different suite file, --quick or --seeds" in str(e.value)
    assert (out / "plan.json").read_bytes() == plan and len(list((out / "results").iterdir())) == 4


# --- the command and --jobs --------------------------------------------------------------------------


def test_command_labels_a_quick_suite_a_smoke_test(suite_file, tmp_path, capsys):
    from widemoe.cli import main

    out = tmp_path / "quick"
    assert main(["experiment", str(suite_file), "--quick", "--out", str(out), "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert SMOKE_LABEL in captured.out and str(out) in captured.out
    assert f"micro-suite ({SMOKE_LABEL}): 2 runs" in captured.err
    plan = json.loads((out / "plan.json").read_text())
    assert plan["quick"] is True and plan["runs"] == ["moe-s0", "dense-s0"]
    for rid in plan["runs"]:
        record = json.loads((out / "results" / f"{rid}.json").read_text())
        assert record["quick"] is True and record["train_config"]["steps"] == 2


def test_command_names_the_shipped_suites_for_an_unknown_one(capsys):
    from widemoe.cli import ErrorExit, main

    with pytest.raises(ErrorExit) as e:
        main(["experiment", "no-such-suite"])
    assert e.value.code == 2
    assert "no shipped suite named 'no-such-suite'" in str(e.value) and "seed-claims" in str(e.value)
    assert "seed-claims" in capsys.readouterr().err


def test_two_jobs_give_the_results_of_one(suite_file, reference, tmp_path):
    lines: list[str] = []
    results = run_suite(load_suite(suite_file), tmp_path / "out", seeds=1, jobs=2, threads=1,
                        notify=lines.append)
    assert [r["run_id"] for r in results] == ["moe-s0", "dense-s0"]
    assert sorted(progress_ids(lines)) == ["dense-s0", "moe-s0"]
    assert_same_heldout(results, reference)
