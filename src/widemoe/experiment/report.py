"""`widemoe experiment report DIR`: summary.json, figures/*.png and report.md of a suite's recorded runs.

The page puts the noise first (every difference is read against it), then one row per claim with its
difference, 95% interval, p-value (Holm-adjusted for the primary claims) and verdict, then the arms, the
compute multiplier and the figures. A --quick suite's page says on its first line, and in every figure,
that it is a smoke test, not evidence; a suite with runs missing says which.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from widemoe.experiment.analysis import analyse, load_suite_dir
from widemoe.experiment.figures import draw_all

SMOKE = "**Smoke test, not evidence**: a `--quick` suite (fewer steps, one seed); its verdicts mean nothing."


def write_report(out: Path) -> Path:
    """Analyse DIR, write DIR/summary.json, DIR/figures/*.png and DIR/report.md; the page's path."""
    summary = analyse(out)
    _, _, results = load_suite_dir(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    figures = draw_all(summary, results, out / "figures")
    page = out / "report.md"
    page.write_text(markdown(summary, [p.relative_to(out) for p in figures]))
    return page


def _num(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _ms(cell: dict[str, Any] | None, digits: int = 3) -> str:
    """mean ± sd (or the mean alone for one seed)."""
    if cell is None:
        return "–"
    sd = f" ± {cell['sd']:.{digits}f}" if cell.get("sd") is not None else ""
    return f"{cell['mean']:.{digits}f}{sd}"


def markdown(s: dict[str, Any], figures: list[Path]) -> str:
    lines = [f"# Suite `{s['suite']}`", ""]
    if s["quick"]:
        lines += [SMOKE, ""]
    lines += [s["description"], ""] if s["description"] else []
    lines += _provenance(s)
    lines += _noise(s)
    lines += _claims(s)
    lines += _arms(s)
    lines += _compute(s)
    if figures:
        lines += ["## Figures", ""] + [f"![{p.stem}]({p.as_posix()})" for p in figures] + [""]
    return "\n".join(lines)


def _provenance(s: dict[str, Any]) -> list[str]:
    host = s["host"]
    commits = ", ".join(c[:10] for c in s["commits"]) + (" (with uncommitted changes)" if s["dirty"] else "")
    out = [f"- runs recorded: {s['recorded_runs']} of {s['planned_runs']}"
           f"; training time {s['train_seconds_total'] / 60:.1f} min, with evaluation "
           f"{s['wall_seconds_total'] / 60:.1f} min (summed over runs)",
           f"- machine: {host['cpu']}, {host['cores']} cores, {host['torch_threads']} torch thread(s) per "
           f"run, torch {host['torch']}",
           f"- code: {commits}"]
    if s["missing_runs"]:
        out.append(f"- **missing runs** (the suite did not finish): {', '.join(s['missing_runs'])}")
    return out + [""]


def _noise(s: dict[str, Any]) -> list[str]:
    n = s["noise"]
    if n["pooled_sd"] is None:
        return ["## Noise", "", f"No noise estimate: {n['reason']}", ""]
    return ["## Noise", "",
            f"Pooled within-arm standard deviation of held-out loss: **{n['pooled_sd']:.4f} nats** "
            f"({n['df']} degrees of freedom, {n['arms']} arms with 2+ seeds). A difference between two arms "
            "smaller than about twice this is not distinguishable from a change of seed.", ""]


def _claims(s: dict[str, Any]) -> list[str]:
    out = ["## Claims", "",
           "Difference = arm b − arm a; 95% t-interval; paired by seed when both arms ran the same seeds, "
           "Welch otherwise; p Holm-adjusted across the primary claims (*). Verdict rules: "
           "`widemoe.experiment.stats.verdict`, margins from the suite file.", "",
           "| claim | b − a | difference [95% CI] | margin | p | verdict |", "|---|---|---|---|---|---|"]
    for c in s["comparisons"]:
        star = " *" if c["primary"] else ""
        pair = f"{c['arm_b']} − {c['arm_a']} ({c['metric']})"
        if c["verdict"] == "not computed":
            out.append(f"| {c['name']}{star} | {pair} | {c['reason']} | {c['margin']} | – | not computed |")
            continue
        p = c["p_holm"] if c["p_holm"] is not None else c["p_value"]
        interval = f"{c['estimate']:+.4f} [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] ({c['method']}, " \
                   f"n={c['n_a']}/{c['n_b']})"
        row = [f"{c['name']}{star}", pair, interval, str(c["margin"]), f"{p:.3g}", f"**{c['verdict']}**"]
        out.append("| " + " | ".join(row) + " |")
    said = [f"- `{c['name']}`: {c['claim']}" for c in s["comparisons"] if c["claim"]]
    out += ["", "What each claim says:", "", *said] if said else []
    return out + [""]


def _arms(s: dict[str, Any]) -> list[str]:
    domains = list(next(iter(s["arms"]))["heldout_loss_by_domain"]) if s["arms"] else []
    head = ["arm", "seeds", "steps", "E/k/shared", "held-out loss", *domains, "MaxVio batch", "MaxVio global",
            "dead", "I(domain;expert) bits", "tokens/s", "GFLOP/s"]
    out = ["## Arms", "", "Mean ± SD over seeds.", "", "| " + " | ".join(head) + " |",
           "|" + "---|" * len(head)]
    for a in s["arms"]:
        shape = f"{a['experts']}/{a['top_k']}/{a['shared']}" if a["routed"] else "dense"
        gflops = a["flops_per_s"]
        cells = [a["arm"], str(len(a["seeds"])), str(a["steps"]), shape, _ms(a["heldout_loss"]),
                 *(_ms(a["heldout_loss_by_domain"][d]) for d in domains), _ms(a["maxvio_batch"]),
                 _ms(a["maxvio_global"]), _ms(a["dead_experts"], 1), _ms(a["mi_bits"]),
                 _ms(a["tokens_per_s"], 0), _num(gflops["mean"] / 1e9 if gflops else None, 2)]
        out.append("| " + " | ".join(cells) + " |")
    return out + [""]


def _compute(s: dict[str, Any]) -> list[str]:
    c = s["compute"]
    if not c["ladder"]:
        return ["## Compute multiplier", "", c.get("reason", "no dense ladder"), ""]
    out = ["## Compute multiplier", "",
           "Dense compute that reaches each MoE arm's mean held-out loss, as a multiple of the MoE arm's "
           "own, "
           "interpolated on the dense ladder ("
           + ", ".join(f"{p['arm']}: loss {p['loss']:.3f}" for p in c["ladder"])
           + ") in log compute. '>' and '<': the MoE loss lies beyond the ladder's end (a bound). Training "
           "FLOP/s against dense: how fast the MoE arm trains per FLOP on this machine, relative to the "
           "dense arms (the wall-clock multiplier is about the FLOPs one times this).", "",
           "| MoE arm | in FLOPs | in training seconds | training FLOP/s against dense |",
           "|---|---|---|---|"]
    for arm, r in c["arms"].items():
        speed = f"{r['speed_vs_dense']:.2f}×" if r.get("speed_vs_dense") else "–"
        out.append(f"| {arm} | {_ratio(r['flops'])} | {_ratio(r['seconds'])} | {speed} |")
    return out + [""]


def _ratio(r: dict[str, Any]) -> str:
    prefix = {"greater": "> ", "less": "< ", None: ""}[r["bound"]]
    return f"{prefix}{r['ratio']:.2f}×"


__all__ = ["SMOKE", "markdown", "write_report"]
