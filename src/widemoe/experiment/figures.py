"""The figures of `widemoe experiment report`: PNGs drawn on matplotlib's Agg canvas (no pyplot state).

- granularity.png: held-out loss against the number of experts (log scale) at fixed active and total
  width, a dot per seed and the arm means joined; other routed arms as open markers.
- differences.png: every comparison's difference b - a with its 95% interval against its decision band
  [-margin, +margin], one panel per metric, primary comparisons in bold.
- maxvio.png: MaxVio of each training batch per step for the arms that differ only in balancing (mean
  over seeds), on a log axis.
- compute.png: held-out loss against training FLOPs and against training seconds (tokens at the run's
  median step speed): the dense ladder's means as a line, a dot per run.
Each function returns the path it wrote, or None when the suite has nothing to draw for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from widemoe.report.plots import new_figure, save_figure

VERDICT_COLOURS = {"supported": "tab:green", "not supported at this scale": "tab:red",
                   "inconclusive": "tab:orange", "not computed": "tab:gray"}


def _save(fig: Figure, path: Path, title: str, quick: bool) -> Path:
    fig.suptitle(title + (" (smoke test, not evidence)" if quick else ""), fontsize=10)
    return save_figure(fig, path)


def _runs_of(results: list[dict[str, Any]], arm: str) -> list[dict[str, Any]]:
    return sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"])


def granularity(summary: dict[str, Any], results: list[dict[str, Any]], path: Path) -> Path | None:
    """Arms with the same active and total routed width as the first routed arm, no shared expert and the
    suite's default balancing: loss against E. Other routed arms are drawn as open markers."""
    routed = [a for a in summary["arms"] if a["routed"]]
    if not routed:
        return None
    ref = results_width(results, routed[0]["arm"])
    balance = routed[0]["balance"]
    line = [a for a in routed if a["shared"] == 0 and a["balance"] == balance
            and results_width(results, a["arm"]) == ref]
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    for a in routed:
        runs = _runs_of(results, a["arm"])
        xs = [a["experts"]] * len(runs)
        ys = [r["metrics"]["heldout_loss"] for r in runs]
        on_line = a in line
        ax.scatter(xs, ys, s=18, facecolors="tab:blue" if on_line else "none",
                   edgecolors="tab:blue" if on_line else "tab:gray", zorder=3)
        if on_line or all(b["experts"] != a["experts"] for b in line):  # labels on a crowded E would overlap
            ax.annotate(a["arm"], (a["experts"], a["heldout_loss"]["mean"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points", color="black" if on_line else "gray")
    if len(line) > 1:
        pts = sorted((a["experts"], a["heldout_loss"]["mean"]) for a in line)
        ax.plot(*zip(*pts, strict=True), color="tab:blue", lw=1.2, label="mean over seeds")
        ax.legend(fontsize=8)
    ax.set_xscale("log", base=2)
    ratio = ref[0] // ref[1] if ref[1] else "?"
    ax.set_xlabel(f"routed experts E (top-k = E/{ratio}, the same total width; open: other arms)", fontsize=8)
    ax.set_ylabel("held-out loss (nats/token, mean of domains)")
    ax.grid(alpha=0.3)
    return _save(fig, path, "Granularity at fixed active and total width", summary["quick"])


def results_width(results: list[dict[str, Any]], arm: str) -> tuple[int, int]:
    """(total, active) routed width of an arm: E * w and k * w, shared experts counted as active."""
    c = _runs_of(results, arm)[0]["model_config"]
    w = c["moe_intermediate_size"]
    return c["n_routed_experts"] * w, (c["num_experts_per_tok"] + c["n_shared_experts"]) * w


def differences(summary: dict[str, Any], path: Path) -> Path | None:
    rows = [c for c in summary["comparisons"] if c["verdict"] != "not computed"]
    if not rows:
        return None
    metrics = list(dict.fromkeys(c["metric"] for c in rows))
    fig = new_figure(7.5, 1.2 + 0.45 * len(rows))
    axes = fig.subplots(len(metrics), 1, squeeze=False,
                        gridspec_kw={"height_ratios": [sum(c["metric"] == m for c in rows) for m in metrics]})
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        sub = [c for c in rows if c["metric"] == metric]
        for i, c in enumerate(sub):
            y = len(sub) - 1 - i
            ax.add_patch(_band(y, c["margin"]))
            colour = VERDICT_COLOURS[c["verdict"]]
            err = [[c["estimate"] - c["ci_low"]], [c["ci_high"] - c["estimate"]]]
            width = 2 if c["primary"] else 1
            ax.errorbar(c["estimate"], y, xerr=err, fmt="o", color=colour, capsize=3, lw=width)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(sub)), [c["name"] + (" *" if c["primary"] else "") for c in reversed(sub)],
                      fontsize=8)
        ax.set_ylim(-0.7, len(sub) - 0.3)
        ax.set_xlabel(f"{metric}: b - a with 95% interval (grey band: +-margin)", fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    return _save(fig, path, "Differences (* primary; colour = verdict)", summary["quick"])


def _band(y: float, margin: float):  # noqa: ANN202 - a matplotlib Rectangle
    from matplotlib.patches import Rectangle

    return Rectangle((-margin, y - 0.35), 2 * margin, 0.7, color="0.85", zorder=0)


def maxvio(summary: dict[str, Any], results: list[dict[str, Any]], path: Path) -> Path | None:
    """Routed arms of one shape that differ in balancing mode: their MaxVio per training step."""
    routed = [a for a in summary["arms"] if a["routed"]]
    by_shape: dict[tuple, list[dict[str, Any]]] = {}
    for a in routed:
        by_shape.setdefault((a["experts"], a["top_k"], a["shared"]), []).append(a)
    group = max(by_shape.values(), key=lambda g: len({a["balance"] for a in g}), default=[])
    if len({a["balance"] for a in group}) < 2:
        return None
    fig = new_figure(6.5, 4.0)
    ax = fig.add_subplot()
    for a in group:
        curves = [[p["max_vio"] for p in r["curves"]["train"]] for r in _runs_of(results, a["arm"])]
        n = min(len(c) for c in curves)
        mean = np.mean([c[:n] for c in curves], axis=0)
        ax.plot(np.arange(1, n + 1), mean, lw=1.2, label=f"{a['arm']} ({a['balance']})")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("MaxVio of the batch (mean of layers and seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path, "Load balance during training", summary["quick"])


def compute(summary: dict[str, Any], results: list[dict[str, Any]], path: Path) -> Path | None:
    ladder = summary["compute"]["ladder"]
    if not ladder:
        return None
    fig = new_figure(10.0, 4.0)
    for ax, key, label in zip(fig.subplots(1, 2), ("flops", "seconds"),
                              ("training FLOPs", "training seconds (this CPU)"), strict=True):
        pts = sorted(ladder, key=lambda p: p[key])
        ax.plot([p[key] for p in pts], [p["loss"] for p in pts], "-s", color="black", label="dense ladder")
        for a in summary["arms"]:
            runs = _runs_of(results, a["arm"])
            # seconds as the ladder counts them: the run's tokens at its median step speed
            xs = [r["flops_per_token"] * a["tokens"] if key == "flops"
                  else a["tokens"] / r["metrics"]["tokens_per_s"] for r in runs]
            ys = [r["metrics"]["heldout_loss"] for r in runs]
            if a["routed"]:
                ax.scatter(xs, ys, s=14, alpha=0.7, label=a["arm"])
            else:
                ax.scatter(xs, ys, s=12, color="black", marker="x", linewidths=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # a ladder spans ~4x: minor labels would overlap
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, path, "MoE against the dense compute ladder (dots: one run each)", summary["quick"])


def draw_all(summary: dict[str, Any], results: list[dict[str, Any]], folder: Path) -> list[Path]:
    drawn = [granularity(summary, results, folder / "granularity.png"),
             differences(summary, folder / "differences.png"),
             maxvio(summary, results, folder / "maxvio.png"),
             compute(summary, results, folder / "compute.png")]
    return [p for p in drawn if p is not None]


__all__ = ["compute", "differences", "draw_all", "granularity", "maxvio"]
