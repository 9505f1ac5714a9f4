"""Figure of the cost calculator: total vs active parameters of every real-size preset (log-log),
with the dense contrast point and the dense line y = x (`widemoe cost --plot PATH`).

Drawn on `matplotlib.figure.Figure` with an explicit Agg canvas, like the routing figures in
`widemoe.report.plots`: no pyplot state and no backend switch in the caller's process.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from widemoe.cost import GPT5_CLASS_DENSE, count_params
from widemoe.presets import PRESET_NAMES, get_preset

_LABEL_OFFSETS = {"v4-seed": (6, -11), "deepseek-v3": (-70, 4)}  # keep close neighbours apart
MIN_TOTAL = 1e9  # tiny/micro test sizes would stretch the axes


def plot_presets(path: str | Path) -> Path:
    """Total vs active parameters (log-log) of every real-size preset, with the dense line y = x."""
    fig = Figure(figsize=(7, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name in PRESET_NAMES:
        p = count_params(get_preset(name))
        if p.main_total < MIN_TOTAL:
            continue
        ax.scatter(p.main_total, p.active_with_embedding, color="tab:blue")
        ax.annotate(name, (p.main_total, p.active_with_embedding), textcoords="offset points",
                    xytext=_LABEL_OFFSETS.get(name, (5, 3)), fontsize=8)
    d = GPT5_CLASS_DENSE.params
    ax.scatter(d, d, color="tab:red", marker="s")
    ax.annotate(GPT5_CLASS_DENSE.name, (d, d), textcoords="offset points", xytext=(-60, 5), fontsize=8)
    ax.plot([1e9, 3e12], [1e9, 3e12], color="gray", linestyle="--", linewidth=1,
            label="dense (active = total)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("total parameters")
    ax.set_ylabel("active parameters per token (with input embedding)")
    ax.set_title("widemoe presets: total vs active parameters")
    ax.legend(loc="upper left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return Path(path)


__all__ = ["plot_presets"]
