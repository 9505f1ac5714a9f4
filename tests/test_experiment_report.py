"""`widemoe experiment report` on synthetic result records with known effects: the noise estimate, paired
and Welch intervals that cover the planted difference, Holm across the primary claims, the three verdicts,
the compute multiplier read off the dense ladder, and the page (smoke-test label, missing runs, figures).
No training: the records are written by hand, so every expected number is known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from widemoe.cli import ErrorExit, main
from widemoe.experiment.analysis import ReportError, analyse, compute_multiplier
from widemoe.experiment.report import SMOKE, write_report
from widemoe.experiment.stats import holm

SUITE = """
[suite]
name = "synthetic"
description = "planted effects"
preset = "micro"
steps = 10
seq_len = 32
batch_size = 4
vocab_size = 512

[suite.model]
num_nextn_predict_layers = 0

[quick]
steps = 2
seeds = 1

[[arm]]
name = "A"
seeds = 4
model = { n_routed_experts = 8, num_experts_per_tok = 2 }

[[arm]]
name = "B"
seeds = 4
model = { n_routed_experts = 8, num_experts_per_tok = 4, moe_intermediate_size = 16 }

[[arm]]
name = "C"
seeds = 4
model = { n_routed_experts = 8, num_experts_per_tok = 2 }
train = { balance = "none" }

[[arm]]
name = "D"
seeds = 3
model = { first_k_dense_replace = 3 }

[[arm]]
name = "D2"
seeds = 2
steps_factor = 2.0
model = { first_k_dense_replace = 3 }

[[comparison]]
name = "clear"
arm_a = "A"
arm_b = "B"
metric = "heldout_loss"
direction = "lower_is_better"
margin = 0.02
primary = true

[[comparison]]
name = "null"
arm_a = "A"
arm_b = "C"
metric = "heldout_loss"
direction = "lower_is_better"
margin = 0.05
primary = true

[[comparison]]
name = "straddle"
arm_a = "D"
arm_b = "A"
metric = "heldout_loss"
direction = "lower_is_better"
margin = 0.02
primary = false

[[comparison]]
name = "balance"
arm_a = "D"
arm_b = "A"
metric = "maxvio_global"
direction = "lower_is_better"
margin = 0.05
"""

# Held-out loss per seed. B = A - 0.1 with per-seed noise (a clear effect); C = A + tiny noise (a null
# within the 0.05 margin); D differs from A by a noisy amount whose interval straddles zero.
A = [4.00, 4.05, 3.95, 4.02]
B = [3.91, 3.94, 3.86, 3.91]
C = [4.001, 4.049, 3.952, 4.019]
D = [4.00, 4.12, 3.90]
D2 = [3.80, 3.82]
FLOPS_PER_TOKEN = 1e6


def _record(arm: str, seed: int, loss: float, routed: bool, steps: int = 10, balance: str = "aux_free"):
    cfg = {"n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 0,
           "moe_intermediate_size": 32}
    metrics = {
        "heldout_loss": loss,
        "heldout_loss_by_domain": {"prose": loss + 0.1, "code": loss - 0.1, "math": loss},
        "maxvio_batch": 0.3 if routed else None, "maxvio_global": 0.2 + 0.01 * seed if routed else None,
        "dead_experts": 0 if routed else None, "mi_bits": 0.05 if routed else None,
        "tokens_per_s": 500.0 if routed else 1000.0, "train_seconds": 10.0 * steps / 10,
    }
    return {
        "run_id": f"{arm}-s{seed}", "arm": arm, "seed": seed, "suite": "synthetic", "quick": False,
        "commit": "0123456789abcdef", "dirty": False, "wall_seconds": 12.0,
        "host": {"cpu": "test", "cores": 2, "torch_threads": 1, "torch": "x"},
        "model_config": cfg, "flops_per_token": FLOPS_PER_TOKEN,
        "train_config": {"steps": steps, "batch_size": 4, "seq_len": 32, "grad_accum": 1, "balance": balance},
        "metrics": metrics,
        "curves": {"train": [{"step": i + 1, "max_vio": 1.0 / (i + 1)} for i in range(steps)], "eval": []},
    }


def _suite_dir(tmp_path: Path, skip: tuple[str, ...] = (), quick: bool = False) -> Path:
    out = tmp_path / "suite-out"
    (out / "results").mkdir(parents=True)
    (out / "suite.toml").write_text(SUITE)
    (out / "plan.json").write_text(json.dumps({"suite": "synthetic", "quick": quick, "seeds": None}))
    rows = [("A", A, True, 10, "aux_free"), ("B", B, True, 10, "aux_free"), ("C", C, True, 10, "none"),
            ("D", D, False, 10, "aux_free"), ("D2", D2, False, 20, "aux_free")]
    for arm, losses, routed, steps, balance in rows:
        for seed, loss in enumerate(losses):
            rec = _record(arm, seed, loss, routed, steps, balance)
            if rec["run_id"] not in skip:
                (out / "results" / f"{rec['run_id']}.json").write_text(json.dumps(rec))
    return out


def _by_name(summary):
    return {c["name"]: c for c in summary["comparisons"]}


def test_noise_is_the_pooled_within_arm_sd(tmp_path):
    s = analyse(_suite_dir(tmp_path))
    groups = [A, B, C, D, D2]
    ss = sum(float(np.sum((np.array(g) - np.mean(g)) ** 2)) for g in groups)
    df = sum(len(g) - 1 for g in groups)
    assert s["noise"]["df"] == df
    assert s["noise"]["pooled_sd"] == pytest.approx(math.sqrt(ss / df), rel=1e-12)


def test_clear_effect_null_and_straddle_get_their_verdicts(tmp_path):
    c = _by_name(analyse(_suite_dir(tmp_path)))
    d = np.array(B) - np.array(A)
    assert c["clear"]["method"] == "paired" and c["clear"]["estimate"] == pytest.approx(d.mean())
    assert c["clear"]["ci_low"] < -0.1 + 0.03 and c["clear"]["ci_high"] < 0  # covers the planted ~ -0.095
    assert c["clear"]["verdict"] == "supported"
    assert c["null"]["verdict"] == "not supported at this scale"
    assert -0.05 <= c["null"]["ci_low"] and c["null"]["ci_high"] <= 0.05
    # D (3 seeds) and A (4 seeds) do not pair: Welch, and its interval straddles zero.
    assert c["straddle"]["method"] == "welch"
    assert c["straddle"]["ci_low"] < 0 < c["straddle"]["ci_high"]
    assert c["straddle"]["verdict"] == "inconclusive"


def test_holm_adjusts_only_the_primary_claims(tmp_path):
    c = _by_name(analyse(_suite_dir(tmp_path)))
    primary = [c["clear"], c["null"]]
    assert [p["p_holm"] for p in primary] == pytest.approx(holm([p["p_value"] for p in primary]))
    assert c["clear"]["p_holm"] > c["clear"]["p_value"]  # a family of two doubles the smallest p
    assert c["straddle"]["p_holm"] is None


def test_a_metric_the_dense_arm_lacks_is_not_computed_with_the_reason(tmp_path):
    c = _by_name(analyse(_suite_dir(tmp_path)))
    assert c["balance"]["verdict"] == "not computed"
    assert "arm D has 0 recorded value(s) of maxvio_global" in c["balance"]["reason"]


def test_compute_multiplier_interpolates_the_dense_ladder_in_log_compute():
    def arm(name, routed, tokens, loss, seconds):
        return {"arm": name, "routed": routed, "tokens": tokens, "flops_per_token": 1.0,
                "heldout_loss": {"mean": loss}, "tokens_per_s": {"mean": tokens / seconds}}

    arms = [arm("d-half", False, 100, 5.0, 10.0), arm("d-1", False, 200, 4.8, 20.0),
            arm("d-2", False, 400, 4.6, 40.0), arm("moe", True, 200, 4.7, 40.0),
            arm("moe-best", True, 200, 4.5, 20.0), arm("moe-worst", True, 200, 5.1, 20.0)]
    out = compute_multiplier(arms)["arms"]
    # 4.7 lies halfway between the 1x (200) and 2x (400) dense points: 200 * 2 ** 0.5 FLOPs.
    assert out["moe"]["flops"] == {"bound": None, "ratio": pytest.approx(math.sqrt(2))}
    # In seconds (tokens at the median speed) the MoE arm took 40 s, the dense ladder reaches its loss in
    # 20 * 2 ** 0.5 s.
    assert out["moe"]["seconds"]["ratio"] == pytest.approx(math.sqrt(2) / 2)
    assert out["moe-best"]["flops"] == {"bound": "greater", "ratio": pytest.approx(2.0)}
    assert out["moe-worst"]["flops"] == {"bound": "less", "ratio": pytest.approx(0.5)}
    assert "speed_vs_dense" not in out["moe"]  # the arms above have no measured FLOP/s
    assert compute_multiplier(arms[3:])["arms"] == {}  # no ladder: nothing read


def test_page_summary_and_figures(tmp_path):
    out = _suite_dir(tmp_path)
    page = write_report(out)
    text = page.read_text()
    for verdict in ("supported", "not supported at this scale", "inconclusive"):
        assert f"**{verdict}**" in text
    assert SMOKE not in text and "missing runs" not in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recorded_runs"] == summary["planned_runs"] == 17
    # Same FLOPs per token, half the tokens/s: the MoE arms train at half the dense FLOP/s.
    assert summary["compute"]["arms"]["A"]["speed_vs_dense"] == pytest.approx(0.5)
    assert "| 0.50× |" in text
    for name in ("granularity", "differences", "maxvio", "compute"):
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"figures/{name}.png" in text


def test_quick_and_incomplete_suites_say_so(tmp_path):
    out = _suite_dir(tmp_path, skip=("B-s3", "D2-s1"), quick=True)
    text = write_report(out).read_text()
    assert text.splitlines()[2] == SMOKE  # right under the title
    # The quick version has one seed per arm: the records beyond it are still read, B-s3 is not planned.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["quick"] is True and summary["planned_runs"] == 5


def test_missing_runs_are_listed(tmp_path):
    out = _suite_dir(tmp_path, skip=("B-s3", "D2-s1"))
    text = write_report(out).read_text()
    assert "**missing runs** (the suite did not finish): D2-s1, B-s3" in text  # run order


def test_report_on_a_directory_that_is_not_a_suite_names_it(tmp_path, capsys):
    with pytest.raises(ReportError, match="not a suite output directory"):
        analyse(tmp_path)
    with pytest.raises(ErrorExit) as e:
        main(["experiment", "report", str(tmp_path)])
    assert e.value.code == 1
    assert str(tmp_path) in capsys.readouterr().err


def test_the_committed_seed_claims_run_regenerates_its_summary():
    """docs/experiments.md is backed by the committed records: the analysis of them is the committed
    summary.json (a change to the statistics or to a record shows up here), and the run is complete."""
    folder = Path(__file__).resolve().parents[1] / "docs" / "experiments" / "seed-claims"
    committed = json.loads((folder / "summary.json").read_text())
    fresh = json.loads(json.dumps(analyse(folder), sort_keys=True))
    assert fresh == committed
    assert fresh["recorded_runs"] == fresh["planned_runs"] == 33 and fresh["missing_runs"] == []
    assert fresh["quick"] is False


@pytest.mark.parametrize("argv, message", [
    (["experiment", "report"], "report needs the suite's output directory"),
    (["experiment", "probe"], "probe needs a model"),
    (["experiment", "seed-claims", "extra"], "unexpected argument 'extra' after the suite"),
])
def test_experiment_usage_errors_exit_2_and_say_what_is_missing(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
