"""Figures of the routing report: PNG files drawn with matplotlib's Agg canvas.

Figures are built on `matplotlib.figure.Figure` with an explicit `FigureCanvasAgg`, never through
pyplot: no global figure state, no backend switch that could disturb a caller's own matplotlib use,
and nothing needs a display. Each function takes the loaded run (`widemoe.report.analysis`), writes one
PNG and returns its path, or returns None when the run has nothing to draw for it (no bias, no
per-domain losses).

Conventions: x axes are optimizer steps; losses are nats per token; MaxVio is max(load)/mean(load) - 1
(Wang et al. 2024, §4.1); loads are normalised to the layer's mean so 1.0 means balanced.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from widemoe.report.analysis import LayerRouting, RunData, layer_label

DPI = 110
MAX_LINE_LAYERS = 8  # MaxVio curves with a legend entry each; more layers are summarised by their mean
MAX_HEATMAP_LAYERS = 12  # domain x expert panels; deeper models show evenly spaced layers
ANNOTATE_MAX_EXPERTS = 16  # write the value in each heatmap cell up to this many experts


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _colors(n: int) -> list:
    tab = colormaps["tab10"]
    return [tab(i % 10) for i in range(n)]


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over up to `window` points (shorter at the start), so it starts at the first step."""
    if window <= 1 or y.size == 0:
        return y
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, y.size + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_loss_by_domain(run: RunData, path: Path) -> Path | None:
    """Train loss per domain (per step), held-out loss per domain (points), unigram baselines (dashed)."""
    domains = list(dict.fromkeys([d for r in run.train for d in r.get("loss_by_domain", {})]
                                 + [d for e in run.evals for d in e.get("heldout_loss", {})]))
    if not domains:
        return None
    fig = new_figure(9, 4.6)
    ax = fig.add_subplot()
    unigram = run.summary.get("unigram_loss", {}) or {}
    for color, d in zip(_colors(len(domains)), domains):
        pts = [(r["step"], r["loss_by_domain"][d]) for r in run.train if d in r.get("loss_by_domain", {})]
        if pts:
            x, y = np.array(pts).T
            ax.plot(x, y, color=color, alpha=0.25, lw=0.8)
            ax.plot(x, _moving_average(y, max(1, len(y) // 30)), color=color, lw=1.6, label=f"{d} (train)")
        ev = [(e["step"], e["heldout_loss"][d]) for e in run.evals if d in e.get("heldout_loss", {})]
        if ev:
            x, y = np.array(ev).T
            ax.plot(x, y, "o", color=color, mec="black", mew=0.6, ms=6, label=f"{d} (held-out)")
        if d in unigram:
            ax.axhline(unigram[d], color=color, ls="--", lw=1.0, label=f"{d} (unigram baseline)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("Loss per domain: train (lines), held-out (points), unigram baseline (dashed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: curves fill the axes
    return save_figure(fig, path)


def plot_max_vio(run: RunData, path: Path) -> Path | None:
    """MaxVio per MoE layer: per training batch (thin), smoothed (thick), and global on the held-out set.

    Beyond MAX_LINE_LAYERS layers (DeepSeek-V3 has 58) the layers are drawn as faint grey lines without
    a legend entry, and their mean over layers carries the colour.
    """
    layers = sorted({int(k) for r in run.train for k in r.get("max_vio", {})}
                    | {int(k) for e in run.evals for k in e.get("heldout_max_vio", {})})
    if not layers:
        return None
    config = (run.start or {}).get("config", {})
    n_layers = config.get("num_hidden_layers")
    many = len(layers) > MAX_LINE_LAYERS
    fig = new_figure(9, 4.6)
    ax = fig.add_subplot()
    highest = 0.0
    for color, layer in zip(_colors(len(layers)), layers):
        name, key = layer_label(layer, n_layers), str(layer)
        pts = [(r["step"], r["max_vio"][key]) for r in run.train if key in r.get("max_vio", {})]
        if pts:
            x, y = np.array(pts).T
            highest = max(highest, float(y.max()))
            if many:
                ax.plot(x, y, color="grey", alpha=0.15, lw=0.6)
            else:
                ax.plot(x, y, color=color, alpha=0.25, lw=0.8)
                ax.plot(x, _moving_average(y, max(1, len(y) // 30)), color=color, lw=1.6,
                        label=f"{name} (train batch)")
        ev = [(e["step"], e["heldout_max_vio"][key]) for e in run.evals
              if key in e.get("heldout_max_vio", {})]
        if ev and not many:
            x, y = np.array(ev).T
            highest = max(highest, float(y.max()))
            ax.plot(x, y, "s", color=color, mec="black", mew=0.6, ms=6, label=f"{name} (held-out)")
    if many:
        pts = [(r["step"], r.get("max_vio_mean", float(np.mean(list(r["max_vio"].values())))))
               for r in run.train if r.get("max_vio")]
        if pts:
            x, y = np.array(pts).T
            ax.plot(x, _moving_average(y, max(1, len(y) // 30)), color="tab:blue", lw=1.8,
                    label=f"mean over {len(layers)} layers (train batch)")
        ev = [(e["step"], e["heldout_max_vio_mean"]) for e in run.evals if "heldout_max_vio_mean" in e]
        if ev:
            x, y = np.array(ev).T
            ax.plot(x, y, "s", color="tab:orange", mec="black", mew=0.6, ms=6,
                    label="mean over layers (held-out)")
        ax.plot([], [], color="grey", alpha=0.5, lw=0.6, label="each layer (train batch)")
    ax.axhline(0.0, color="black", lw=0.8)
    n_exp, top_k = config.get("n_routed_experts"), config.get("num_experts_per_tok")
    # Every token on the same K experts gives the largest MaxVio possible; drawn only when the data gets near.
    if n_exp and top_k and n_exp / top_k - 1 <= 1.5 * highest:
        ceiling = n_exp / top_k - 1
        ax.axhline(ceiling, color="grey", ls=":", lw=1.0, label=f"ceiling E/K - 1 = {ceiling:g}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MaxVio = max load / mean load - 1")
    ax.set_title("Load imbalance per MoE layer (0 = perfectly balanced)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, path)


def _annotate(ax, values_RC: np.ndarray, fmt: str, dark_RC: np.ndarray) -> None:
    """Write each value in its cell (white on the cells `dark_RC` marks), when there are few columns."""
    if values_RC.shape[1] > ANNOTATE_MAX_EXPERTS:
        return
    for (r, c), v in np.ndenumerate(values_RC):
        ax.text(c, r, format(v, fmt), ha="center", va="center", fontsize=7,
                color="white" if dark_RC[r, c] else "black")


def plot_expert_load(layers: Sequence[LayerRouting], path: Path, eval_step: int,
                     num_hidden_layers: int | None = None) -> Path | None:
    """Heatmap layer x expert of held-out load / mean load (1.0 = balanced; diverging around 1)."""
    if not layers:
        return None
    n_exp = max(lr.n_experts for lr in layers)
    rel = np.full((len(layers), n_exp), np.nan)
    for i, lr in enumerate(layers):
        mean = lr.load_E.mean()
        rel[i, : lr.n_experts] = lr.load_E / mean if mean > 0 else 0.0
    vmax = max(2.0, float(np.nanmax(rel)))
    fig = new_figure(min(16, max(7.5, 3 + 0.32 * n_exp)), 1.9 + min(12.0, 0.45 * len(layers)))
    ax = fig.add_subplot()
    im = ax.imshow(rel, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax),
                   interpolation="nearest")
    rel0 = np.nan_to_num(rel)
    _annotate(ax, rel0, ".2f", dark_RC=(rel0 < 0.35) | (rel0 > 1 + 0.65 * (vmax - 1)))
    every = max(1, len(layers) // 24)  # at most ~24 row labels
    ax.set_yticks(range(0, len(layers), every),
                  [layer_label(lr.layer, num_hidden_layers) for lr in layers][::every])
    ax.set_xticks(_expert_ticks(n_exp))
    ax.set_xlabel("routed expert")
    ax.set_title(f"Expert load on the held-out set (step {eval_step})\n"
                 "relative to the layer mean: 1.0 = balanced", fontsize=10)
    fig.colorbar(im, ax=ax, label="load / mean load")
    return save_figure(fig, path)


def _expert_ticks(n_experts: int) -> range:
    """Every expert up to 64, else about 32 evenly spaced ticks (256 experts would be unreadable)."""
    return range(n_experts) if n_experts <= 64 else range(0, n_experts, n_experts // 32)


def _pick_layers(layers: Sequence[LayerRouting], limit: int) -> list[LayerRouting]:
    if len(layers) <= limit:
        return list(layers)
    idx = np.unique(np.linspace(0, len(layers) - 1, limit).round().astype(int))
    return [layers[i] for i in idx]


def plot_domain_expert(layers: Sequence[LayerRouting], path: Path, eval_step: int,
                       num_hidden_layers: int | None = None) -> Path | None:
    """Per layer, rows = domains, columns = experts: the share of the domain's assignments per expert."""
    shown = _pick_layers(layers, MAX_HEATMAP_LAYERS)
    if not shown:
        return None
    n_exp = max(lr.n_experts for lr in shown)
    n_dom = max(len(lr.domains) for lr in shown)
    vmax = 100 * max(float(lr.share_DE.max()) for lr in shown) or 100.0  # in %
    fig = new_figure(min(16, max(7.5, 3 + 0.32 * n_exp)), 1.1 + len(shown) * (0.55 + 0.32 * n_dom))
    axes = fig.subplots(len(shown), 1, squeeze=False)[:, 0]
    im = None
    for ax, lr in zip(axes, shown):
        im = ax.imshow(100 * lr.share_DE, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax,
                       interpolation="nearest")
        _annotate(ax, lr.share_DE * 100, ".0f", dark_RC=100 * lr.share_DE < 0.6 * vmax)  # viridis: dark low
        ax.set_yticks(range(len(lr.domains)), lr.domains)
        ax.set_xticks(_expert_ticks(lr.n_experts))
        ax.set_title(f"{layer_label(lr.layer, num_hidden_layers)}: I(domain; expert) = {lr.mi_bits:.3f} bits "
                     f"({100 * lr.mi_normalised:.1f}% of H(domain) = {lr.h_domain_bits:.2f} bits)",
                     fontsize=9)
    axes[-1].set_xlabel("routed expert")
    note = "" if len(shown) == len(layers) else f" ({len(shown)} of {len(layers)} layers shown)"
    fig.suptitle(f"Domain x expert routing on the held-out set (step {eval_step}){note}\n"
                 f"share of each domain's assignments in % (uniform router: {100 / n_exp:.1f}%)", fontsize=10)
    fig.colorbar(im, ax=list(axes), label="% of the domain's token-expert assignments")
    return save_figure(fig, path)


def plot_bias_range(run: RunData, path: Path) -> Path | None:
    """Range [min, max] of the aux-loss-free selection biases over all layers per step (None: no bias)."""
    pts = [(r["step"], r["bias_min"], r["bias_max"]) for r in run.train
           if "bias_min" in r and "bias_max" in r]
    if not pts:
        return None
    x, lo, hi = np.array(pts).T
    fig = new_figure(8, 3.6)
    ax = fig.add_subplot()
    ax.fill_between(x, lo, hi, color="tab:blue", alpha=0.2, label="range over all experts and layers")
    ax.plot(x, hi, color="tab:red", lw=1.4, label="max bias")
    ax.plot(x, lo, color="tab:blue", lw=1.4, label="min bias")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("selection bias (added to router scores)")
    ax.set_title("Aux-loss-free balancing: range of the expert selection biases")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path)
