"""Suite files of `widemoe experiment`: the shipped seed-claims suite, the run order, and the validation
errors (each names the file, the entry, the field and the rule). No training: configs are only built."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest

from widemoe.experiment.stats import Rule
from widemoe.experiment.suite import (
    Run,
    SuiteError,
    interleaved_runs,
    load_suite,
    shipped_suite,
)

MINI = """
[suite]
name = "mini"
description = "two arms"
preset = "micro"
steps = 10
seq_len = 32
batch_size = 2
vocab_size = 512

[suite.model]
num_nextn_predict_layers = 0

[quick]
steps = 3
seeds = 1

[[arm]]
name = "A"
seeds = 3
model = { n_routed_experts = 8, num_experts_per_tok = 2 }

[[arm]]
name = "B"
seeds = 3
model = { n_routed_experts = 8, num_experts_per_tok = 4, moe_intermediate_size = 16 }
train = { balance = "none" }

[[arm]]
name = "C"
seeds = 1
steps_factor = 2.0

[[comparison]]
name = "b-beats-a"
arm_a = "A"
arm_b = "B"
metric = "heldout_loss"
direction = "lower_is_better"
margin = 0.02
primary = true
claim = "B is better"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "suite.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_shipped_suite_loads_and_matches_the_width_rules():
    suite = load_suite(shipped_suite("seed-claims"))
    configs = suite.arm_configs()
    assert set(configs) >= {"E8k2", "E16k4", "E32k8", "E64k16", "S1-E31k7", "E32k8-switch-aux",
                            "E32k8-seq-aux", "E32k8-none", "dense-0.5x", "dense-1x", "dense-2x", "E128k8"}
    for name, c in configs.items():
        assert c.num_nextn_predict_layers == 0 and c.n_group == 1, name  # MTP and groups off
        assert c.hidden_size == 256 and c.num_hidden_layers == 4, name  # tiny's dimensions
        if name.startswith("dense"):
            assert c.moe_layer_indices == [] and c.intermediate_size == 1024, name
            continue
        width = c.moe_intermediate_size
        active = (c.num_experts_per_tok + c.n_shared_experts) * width
        total = (c.n_routed_experts + c.n_shared_experts) * width
        assert active == 1024, name
        assert total == (16384 if name == "E128k8" else 4096), name
        assert c.intermediate_size == 1024, name  # the dense layer 0 matches the dense arms
    balance = {a.name: a.train.get("balance", "aux-free") for a in suite.arms if a.name.startswith("E32k8")}
    assert balance == {"E32k8": "aux-free", "E32k8-switch-aux": "switch-aux", "E32k8-seq-aux": "seq-aux",
                       "E32k8-none": "none"}
    steps = {a.name: suite.arm_steps(a) for a in suite.arms}
    assert steps["dense-0.5x"] * 2 == steps["dense-1x"] == steps["dense-2x"] // 2
    assert all(suite.arm(n).seeds == 3 for n in ("E8k2", "E32k8", "S1-E31k7", "dense-1x"))
    assert suite.arm("E128k8").seeds < 3
    primary = [c for c in suite.comparisons if c.primary]
    assert primary and all(isinstance(c.rule, Rule) and c.claim for c in suite.comparisons)
    quick = suite.quick()
    assert quick.is_quick and quick.train["steps"] < suite.train["steps"]
    assert all(a.seeds == 1 for a in quick.arms)


def test_train_config_per_run(tmp_path):
    suite = load_suite(write(tmp_path, MINI))
    tc = suite.train_config(suite.arm("B"), 2, str(tmp_path / "B-s2"))
    assert (tc.seed, tc.balance, tc.steps, tc.preset, tc.seq_len) == (2, "none", 10, "micro", 32)
    assert tc.model_overrides == {"num_nextn_predict_layers": 0, "n_routed_experts": 8,
                                  "num_experts_per_tok": 4, "moe_intermediate_size": 16}
    assert suite.train_config(suite.arm("C"), 0, "x").steps == 20  # steps_factor 2
    assert suite.quick().train_config(suite.arm("C"), 0, "x").steps == 6
    assert suite.comparisons[0].rule == Rule("b-beats-a", "lower_is_better", 0.02)


def test_interleaving_is_seed_by_seed(tmp_path):
    suite = load_suite(write(tmp_path, MINI))
    runs = interleaved_runs(suite)
    assert runs == [Run("A", 0), Run("B", 0), Run("C", 0), Run("A", 1), Run("B", 1), Run("A", 2), Run("B", 2)]
    assert [r.run_id for r in runs[:3]] == ["A-s0", "B-s0", "C-s0"]
    assert len({r.run_id for r in runs}) == len(runs)
    # --seeds N sets the full arms' count and caps the others
    assert interleaved_runs(suite, seeds=4)[-2:] == [Run("A", 3), Run("B", 3)]
    assert [r.run_id for r in interleaved_runs(suite, seeds=1)] == ["A-s0", "B-s0", "C-s0"]
    assert [r.run_id for r in interleaved_runs(suite.quick())] == ["A-s0", "B-s0", "C-s0"]
    with pytest.raises(SuiteError, match="--seeds 0"):
        interleaved_runs(suite, seeds=0)


def edit(old: str, new: str) -> str:
    assert old in MINI
    return MINI.replace(old, new, 1)


# (the change to MINI, the parts the message must contain)
BAD = [
    (edit('name = "mini"', 'name = "mini"\ncolour = "red"'), ["[suite]", "unknown field", "colour"]),
    (edit('name = "B"\nseeds = 3', 'name = "B"\nseeds = 3\nwidth = 2'), ['arm[1] "B"', "width", "unknown"]),
    (edit('name = "B"', 'name = "A"'), ['arm[1] "A"', "name", "duplicate"]),
    (edit('name = "B"\nseeds = 3', 'name = "B"\nseeds = 0'), ['arm[1] "B"', "seeds = 0", ">= 1"]),
    (edit('steps_factor = 2.0', 'steps_factor = -1'), ['arm[2] "C"', "steps_factor", "> 0"]),
    (edit('arm_b = "B"', 'arm_b = "Z"'), ['comparison[0] "b-beats-a"', "arm_b = 'Z'", "no arm"]),
    (edit('metric = "heldout_loss"', 'metric = "accuracy"'), ["comparison[0]", "metric", "must be one of"]),
    (edit('direction = "lower_is_better"', 'direction = "down"'), ["comparison[0]", "direction"]),
    (edit("margin = 0.02", "margin = -1"), ["comparison[0]", "margin", ">= 0"]),
    (edit("num_experts_per_tok = 2 }", "num_experts_per_tk = 2 }"),
     ['arm[0] "A" model', "unknown field", "num_experts_per_tk", "did you mean num_experts_per_tok"]),
    (edit("num_experts_per_tok = 2 }", "num_experts_per_tok = 20 }"),
     ['arm[0] "A" model', "num_experts_per_tok=20 exceeds n_routed_experts=8"]),
    (edit('train = { balance = "none" }', 'train = { balance = "magic" }'),
     ['arm[1] "B" train', "balance", "must be one of"]),
    (edit('train = { balance = "none" }', "train = { steps = 5 }"),
     ['arm[1] "B" train', "steps", "steps_factor"]),
    (edit("seq_len = 32", "seq_len = 0"), ['arm[0] "A" train', "seq_len", ">= 1"]),
    (edit("steps = 3", "steps = 0"), ["[quick]", "steps = 0", ">= 1"]),
    (edit('preset = "micro"', 'preset = "huge"'), ["[suite]", "preset = 'huge'", "must be one of"]),
    (edit('name = "C"', 'name = "C/D"'), ['arm[2] "C/D"', "name", "letters"]),
    (MINI + "\n[extra]\n", ["unknown field", "extra"]),
    (MINI.replace("[suite]", "[suite", 1), ["not valid TOML"]),
]


@pytest.mark.parametrize(("text", "parts"), BAD, ids=[p[-1] for _, p in BAD])
def test_validation_errors_name_file_entry_field(tmp_path, text, parts):
    path = write(tmp_path, text)
    with pytest.raises(SuiteError) as info:
        load_suite(path)
    message = str(info.value)
    assert str(path) in message
    for part in parts:
        assert part in message, (part, message)


def test_missing_file_and_unknown_shipped_suite(tmp_path):
    with pytest.raises(SuiteError, match="cannot read suite file"):
        load_suite(tmp_path / "nope.toml")
    with pytest.raises(SuiteError, match="seed-claims"):
        shipped_suite("nope")


def test_margins_and_steps_are_finite_in_shipped_suite():
    suite = load_suite(shipped_suite("seed-claims"))
    assert all(math.isfinite(c.margin) and c.margin > 0 for c in suite.comparisons)
    assert {c.arm_a for c in suite.comparisons} | {c.arm_b for c in suite.comparisons} <= {
        a.name for a in suite.arms
    }
