"""The routing report: MI / top-3 math, loading (torn lines, resumes), figures, report.html, the command.

Runs are synthetic metrics.jsonl files in the trainer's record format (no training), so this file is fast.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from widemoe.commands import report as report_cmd
from widemoe.presets import get_preset
from widemoe.report import ReportError, analyse_routing, build_report, load_run, summarise, summary_text
from widemoe.report.analysis import entropy_bits, layer_label, mutual_information_bits, top_n_share

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DOMAINS = ("prose", "code", "math")
E = 8


def _counts(step: int) -> dict[str, dict[str, list[float]]]:
    """Layer 1 specialises (each domain prefers its own experts), layer 2 is domain-blind."""
    rng = np.random.default_rng(step)
    out: dict[str, dict[str, list[float]]] = {}
    for i, d in enumerate(DOMAINS):
        spec = np.full(E, 10.0)
        spec[2 * i: 2 * i + 2] = 200.0
        out[d] = {"1": (spec + rng.integers(0, 5, E)).tolist(), "2": [50.0] * E}
    return out


def _train(step: int, bias: bool = True) -> dict:
    rec = {"kind": "train", "step": step, "tokens": 512 * step, "lr": 1e-3, "loss": 6.0 - 0.05 * step,
           "lm_loss": 5.5 - 0.05 * step, "grad_norm": 1.0, "step_time": 0.5, "tokens_per_s": 1000.0 + step,
           "loss_by_domain": {d: 5.5 - 0.05 * step + 0.1 * i for i, d in enumerate(DOMAINS)},
           "max_vio": {"1": 1.0 / step, "2": 0.5, "3": 0.7}, "max_vio_mean": 0.5,
           "dead_experts": {"1": 0, "2": 0, "3": 0}, "mfu": 0.02}
    if bias:
        rec.update(bias_min=-1e-3 * step, bias_max=1e-3 * step)
    return rec


def _eval(step: int) -> dict:
    return {"kind": "eval", "step": step, "tokens": 512 * step,
            "heldout_loss": {d: 5.4 - 0.05 * step + 0.1 * i for i, d in enumerate(DOMAINS)},
            "heldout_max_vio": {"1": 0.9, "2": 0.0}, "heldout_max_vio_mean": 0.45,
            "heldout_dead_experts": {"1": 0, "2": 0}, "domain_expert_counts": _counts(step)}


def write_run(run_dir: Path, steps: int = 12, bias: bool = True, evals: bool = True, summary: bool = True,
              torn: bool = False) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    recs = [{"kind": "start", "config": get_preset("micro").to_dict(), "train": {"steps": steps},
             "params": 340_544, "peak_flops": 1e11, "flops_per_token": 1e6}]
    for s in range(1, steps + 1):
        recs.append(_train(s, bias))
        if evals and s % 4 == 0:
            recs.append(_eval(s))
    lines = [json.dumps(r) for r in recs]
    text = "\n".join(lines) + "\n" + ('{"kind": "train", "step": 99, "lo' if torn else "")
    (run_dir / "metrics.jsonl").write_text(text)
    if summary:
        (run_dir / "summary.json").write_text(json.dumps({
            "unigram_loss": {"prose": 6.25, "code": 6.5, "math": 6.75},
            "samples": [{"domain": "code", "prompt": "def <f>(x):", "completion": " return x & 1"}],
            "comparison": {"balance_none": {"heldout_max_vio_mean": 2.5}}, "wall_time_s": 361.25,
        }))
    return run_dir


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run = write_run(tmp_path_factory.mktemp("run") / "run")
    return run, build_report(run)


# --- information math -----------------------------------------------------------------------------


def test_mi_of_independent_table_is_zero():
    p_d, p_e = np.array([1, 2, 3]), np.array([4, 1, 1, 2])
    assert mutual_information_bits(np.outer(p_d, p_e) * 10) == pytest.approx(0.0, abs=1e-12)


def test_mi_of_uniform_router_is_zero():
    assert mutual_information_bits(np.full((3, 8), 7.0)) == pytest.approx(0.0, abs=1e-12)


def test_mi_of_perfect_specialisation_is_domain_entropy():
    # domain 0 only on expert 0 (10 assignments), domain 1 only on expert 1 (30): I = H(1/4, 3/4)
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert mutual_information_bits(np.array([[10, 0, 0], [0, 30, 0]])) == pytest.approx(h, abs=1e-12)
    assert h == pytest.approx(0.811278, abs=1e-6)


def test_mi_of_hand_computed_table():
    # p = [[1/4, 1/4], [0, 1/2]]: H(D) = 1, H(E) = H(1/4, 3/4), H(D, E) = 1.5
    expected = 1 + entropy_bits(np.array([0.25, 0.75])) - 1.5
    assert expected == pytest.approx(0.311278, abs=1e-6)
    assert mutual_information_bits(np.array([[1, 1], [0, 2]])) == pytest.approx(expected, abs=1e-12)


def test_mi_rejects_bad_tables():
    with pytest.raises(ValueError, match="2-D"):
        mutual_information_bits(np.ones(4))
    with pytest.raises(ValueError, match="negative"):
        mutual_information_bits(np.array([[1, -1]]))
    assert mutual_information_bits(np.zeros((2, 3))) == 0.0


def test_top_n_share():
    assert top_n_share(np.array([1, 5, 1, 1, 1, 1])) == pytest.approx(7 / 10)
    assert top_n_share(np.full(8, 3.0)) == pytest.approx(3 / 8)
    assert top_n_share(np.zeros(4)) == 0.0


def test_analyse_routing_layers():
    counts = {"a": {"1": [4, 0, 0, 0], "2": [1, 1, 1, 1]}, "b": {"1": [0, 0, 4, 0]}}  # b has no layer 2
    layers = analyse_routing(counts)
    assert [lr.layer for lr in layers] == [1, 2]
    l1, l2 = layers
    assert l1.mi_bits == pytest.approx(1.0) and l1.mi_normalised == pytest.approx(1.0)
    assert l1.load_E.tolist() == [4, 0, 4, 0] and l1.dead_experts == 2 and l1.max_vio == pytest.approx(1.0)
    assert l1.top_share == {"a": 1.0, "b": 1.0} and l1.uniform_top_share == pytest.approx(3 / 4)
    assert l1.share_DE[0].tolist() == [1, 0, 0, 0]
    assert l2.counts_DE[1].tolist() == [0, 0, 0, 0] and l2.mi_bits == 0.0 and l2.h_domain_bits == 0.0
    with pytest.raises(ReportError, match="layer 1.*different expert counts"):
        analyse_routing({"a": {"1": [1, 2]}, "b": {"1": [1, 2, 3]}})


def test_layer_label_names_mtp_modules():
    assert layer_label(2, 3) == "layer 2" and layer_label(3, 3) == "MTP 0"
    assert layer_label(5, None) == "layer 5"


# --- loading --------------------------------------------------------------------------------------


def test_load_tolerates_torn_line_and_folds_resume(tmp_path):
    run = write_run(tmp_path / "r", steps=8, torn=True, summary=False)
    with open(run / "metrics.jsonl", "a") as f:  # a resume from step 5 rewrites steps 6.. after the torn line
        f.write("\n" + "\n".join(json.dumps({**_train(s), "loss": 0.0}) for s in (6, 7, 8, 9)) + "\n")
    data = load_run(run)
    assert [r["step"] for r in data.train] == list(range(1, 10))
    assert [r["loss"] for r in data.train[5:]] == [0.0] * 4 and data.train[4]["loss"] != 0.0
    assert [e["step"] for e in data.evals] == [4, 8] and data.summary == {}


def test_summarise_headline_numbers(tmp_path):
    s = summarise(load_run(write_run(tmp_path / "r")))
    assert s.steps == 12 and s.tokens == 512 * 12 and s.eval_step == 12 and s.params == 340_544
    assert s.tokens_per_s == pytest.approx(1000 + 7)  # median of steps 2..12, the warm-up step left out
    assert s.mfu == pytest.approx(0.02) and s.final_train_loss == pytest.approx(5.5 - 0.6)
    assert s.unigram_loss["math"] == 6.75 and s.heldout_max_vio_mean == 0.45
    l1, l2 = s.layers
    assert l1.mi_bits > 0.5 * l1.h_domain_bits and l2.mi_bits == pytest.approx(0.0, abs=1e-12)
    assert min(l1.top_share.values()) > 0.7 and l2.top_share["prose"] == pytest.approx(3 / 8)
    assert s.active_params is not None and s.active_params < s.params


def test_missing_metrics_and_missing_eval_are_clear_errors(tmp_path):
    with pytest.raises(ReportError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="metrics.jsonl not found"):
        build_report(tmp_path / "empty")
    run = write_run(tmp_path / "noeval", evals=False)
    with pytest.raises(ReportError, match="no 'eval' record"):
        build_report(run)
    assert not (run / "report" / "report.html").exists()
    (tmp_path / "badsum").mkdir()
    write_run(tmp_path / "badsum")
    (tmp_path / "badsum" / "summary.json").write_text("[1, 2")
    with pytest.raises(ReportError, match="summary.json is not valid JSON"):
        load_run(tmp_path / "badsum")


# --- report ---------------------------------------------------------------------------------------


def test_report_writes_valid_pngs(built):
    run, paths = built
    assert set(paths.figures) == {"loss_by_domain", "max_vio", "expert_load", "domain_expert", "bias_range"}
    for path in paths.figures.values():
        data = path.read_bytes()
        assert path.parent == run / "report" and data[:8] == PNG_SIGNATURE and len(data) > 10_000, path


def test_report_html_tables_and_samples(built):
    run, paths = built
    page = paths.html.read_text()
    assert paths.html == run / "report" / "report.html"
    for path in paths.figures.values():  # referenced relatively, next to the page
        assert f'src="{path.name}"' in page
    s = summarise(load_run(run))
    assert f"{s.layers[0].mi_bits:.4f}" in page and "6.7500" in page  # MI of layer 1, math unigram
    assert "def &lt;f&gt;(x):" in page and "return x &amp; 1" in page  # sample, escaped
    assert "balance_none.heldout_max_vio_mean" in page and "wall_time_s</td><td class=l>361.2" in page
    assert "<script" not in page and "http" not in page  # self-contained


def test_report_without_summary_or_bias_embedded(tmp_path):
    run = write_run(tmp_path / "r", bias=False, summary=False)
    paths = build_report(run, out_dir=tmp_path / "out", embed=True)
    assert "bias_range" not in paths.figures and paths.html == tmp_path / "out" / "report.html"
    page = paths.html.read_text()
    assert page.count("data:image/png;base64,") == 4 and "Sample generations" not in page
    assert "<td>n/a</td>" in page  # no unigram baseline


def test_summary_text(built):
    run, _ = built
    text = summary_text(run)
    assert "I(domain;expert)" in text and "layer 1" in text and "layer 2" in text
    assert "unigram 6.750" in text and "better than unigram" in text and "top-3 share" in text
    assert "balance_none.heldout_max_vio_mean: 2.5" in text and "summary.json: wall_time_s 361.2" in text
    assert len(text.splitlines()) <= 40 and max(len(line) for line in text.splitlines()) <= 120


# --- command --------------------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    report_cmd.add_parser(parser.add_subparsers())
    return parser.parse_args(argv)


def test_command_exit_codes(tmp_path, capsys):
    run = write_run(tmp_path / "r", summary=False)
    args = _parse(["report", str(run), "--quiet", "--out", str(tmp_path / "o")])
    assert args.func is report_cmd.run
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'o' / 'report.html'}" in out and "max_vio.png" in out
    assert (tmp_path / "o" / "report.html").is_file()

    args = _parse(["report", str(tmp_path / "missing")])
    assert args.func(args) == 1
    assert "error:" in capsys.readouterr().err
    args = _parse(["report", str(write_run(tmp_path / "noeval", evals=False))])
    assert args.func(args) == 1
    assert "no 'eval' record" in capsys.readouterr().err


def test_stopped_run_is_flagged_until_resumed(tmp_path):
    run = write_run(tmp_path / "r", summary=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "stopped", "step": 12, "reason": "non-finite loss at step 13"}) + "\n")
    s = summarise(load_run(run))
    assert s.stopped == "non-finite loss at step 13"
    assert "STOPPED: non-finite loss" in summary_text(run)
    with open(run / "metrics.jsonl", "a") as f:  # a later --resume trained past the stop
        f.write(json.dumps(_train(13)) + "\n")
    assert summarise(load_run(run)).stopped is None


def test_command_through_the_cli_entry_point(tmp_path, monkeypatch, capsys):
    from widemoe import cli

    if "report" not in cli.COMMANDS:  # until the lead wires the command in
        monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, "report"))
    assert cli.main(["report", str(tmp_path / "nothing-here")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_summary_states_the_peak_mfu_is_measured_against(built):
    """MFU depends on a peak measured once at start-up on a shared machine: the summary and the page say
    which peak, so a figure taken on a busy machine can be judged (issue 11)."""
    run, _ = built
    assert summarise(load_run(run)).peak_flops == 1e11
    assert "MFU is against a 100 GFLOP/s matmul peak measured at start-up" in summary_text(run)


def test_a_resumed_writer_cuts_the_torn_line_so_records_never_run_together(tmp_path):
    from widemoe.train.metrics import MetricsWriter, read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_train(1)) + "\n" + '{"kind": "train", "step": 2, "lo')  # crash mid-write
    w = MetricsWriter(path)
    assert w.dropped_torn_tail == len('{"kind": "train", "step": 2, "lo')
    w.write(_train(2))
    bad: list[int] = []
    assert [r["step"] for r in read_metrics(path, bad)] == [1, 2] and bad == []


def test_a_garbled_line_before_the_end_is_named_not_silently_dropped(tmp_path):
    run = write_run(tmp_path / "r", steps=8, summary=False)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if '"kind": "eval"' in line)
    lines[i] = lines[i][:20]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    data = load_run(run)
    assert data.bad_lines == [i + 1] and f"line {i + 1}" in data.warnings[0]
