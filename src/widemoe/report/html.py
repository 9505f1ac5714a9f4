"""The routing report of a run: `report.html` with its PNG figures, and the plain-text summary of the demo.

`build_report(run_dir)` reads `RUN/metrics.jsonl` (+ optional `RUN/summary.json`), writes the figures of
`widemoe.report.plots` and one self-contained HTML page (inline CSS, no scripts, nothing fetched) into
`RUN/report/`. Figures are PNG files next to the page, referenced by relative path, so the folder can be
moved or zipped as a whole; `embed=True` inlines them as base64 for a single file to mail around.

`summary_text(run_dir)` is the one-screen plain-text summary `make demo` prints at the end: model,
throughput, held-out loss per domain against the unigram baseline, MaxVio, and per layer the mutual
information between domain and expert and the top-3 shares (definitions in `widemoe.report.analysis`).
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from widemoe.report import plots
from widemoe.report.analysis import TOP_N, RunData, RunSummary, load_run, summarise
from widemoe.report.evals import load_eval_scores, score_rows, scores_text

MAX_TEXT_LAYERS = 8  # layers listed in summary_text (one screen); the HTML lists them all
KNOWN_SUMMARY_KEYS = ("unigram_loss", "samples", "comparison")  # other summary.json keys show as-is


@dataclass
class ReportPaths:
    html: Path
    figures: dict[str, Path] = field(default_factory=dict)  # name -> PNG path (absent when nothing to draw)
    warnings: list[str] = field(default_factory=list)  # what the reader should know about the input


# --------------------------------------------------------------------------------------------------
# Formatting


def _count(n: float | None) -> str:
    if n is None:
        return "n/a"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.3g}"


def _pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _num(x: Any) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x) if not isinstance(x, (list, dict)) else json.dumps(x)
    return f"{x:,}" if isinstance(x, int) else f"{x:.4g}"


def _model_line(s: RunSummary) -> str:
    c = s.config
    if not c:
        return "model: n/a (no start record)"
    n_moe = len(s.layers)
    shared = f" + {c['n_shared_experts']} shared" if c.get("n_shared_experts") else ""
    return (f"{c.get('model_type', '?')}: {c.get('num_hidden_layers', '?')} layers ({n_moe} MoE), "
            f"{c.get('n_routed_experts', '?')} routed experts, "
            f"top-{c.get('num_experts_per_tok', '?')}{shared}, "
            f"{_count(s.params)} params ({_count(s.active_params)} active per token)")


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Free-form JSON as (dotted key, value) rows, for the 'comparison' section of summary.json."""
    if isinstance(d, dict) and d:
        rows: list[tuple[str, str]] = []
        for k, v in d.items():
            rows += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    return [(prefix or "value", _num(d))]


# --------------------------------------------------------------------------------------------------
# Plain text


def summary_text(run_dir: str | Path) -> str:
    """One screen of plain text: the run's headline numbers and routing statistics (no markup)."""
    run = load_run(run_dir)
    text = _summary_text(summarise(run), run.summary)
    scores = scores_text(load_eval_scores(run.run_dir))  # written by `widemoe eval RUN`
    return text + ("\nlm-eval scores (RUN/eval/):\n" + "\n".join("  " + line for line in scores.splitlines())
                   if scores else "")


def _peak(s: RunSummary) -> str:
    """The peak MFU is taken against: one matmul measured at start-up on a possibly shared machine, so a
    busy start makes MFU read high; shown so the figure can be judged."""
    if not s.peak_flops:
        return ""
    return f"\n  MFU is against a {s.peak_flops / 1e9:.0f} GFLOP/s matmul peak measured at start-up"


def _summary_text(s: RunSummary, extra: dict[str, Any]) -> str:
    lines = [f"run {s.run_dir}", "  " + _model_line(s),
             f"  trained {s.steps:,} steps, {_count(s.tokens)} tokens, "
             f"{_count(s.tokens_per_s)} tokens/s, MFU {_pct(s.mfu)} (medians over steps){_peak(s)}"]
    if s.stopped:
        lines.append(f"  STOPPED: {s.stopped}")
    lines.append(f"held-out loss at step {s.eval_step} (nats/token):")
    for d, v in s.heldout_loss.items():
        uni = s.unigram_loss.get(d)
        vs = "" if uni is None else (f"  unigram {uni:.3f}  ({abs(uni - v):.3f} "
                                     f"{'better' if v <= uni else 'WORSE'} than unigram)")
        lines.append(f"  {d:<8} {v:.3f}{vs}")
    lines.append(f"routing on the held-out set: MaxVio mean {s.heldout_max_vio_mean:.3f}, "
                 f"dead experts {s.dead_experts}")
    shown = s.layers
    if len(s.layers) > MAX_TEXT_LAYERS:  # evenly spaced layers, first and last included
        idx = sorted({round(i * (len(s.layers) - 1) / (MAX_TEXT_LAYERS - 1)) for i in range(MAX_TEXT_LAYERS)})
        shown = [s.layers[i] for i in idx]
        mis = [lr.mi_bits for lr in s.layers]
        lines.append(f"  {len(s.layers)} MoE layers: I(domain;expert) mean {sum(mis) / len(mis):.3f} bits, "
                     f"min {min(mis):.3f}, max {max(mis):.3f}; {len(shown)} of them:")
    for lr in shown:
        tops = " ".join(f"{d} {_pct(v)}" for d, v in lr.top_share.items())
        lines.append(f"  layer {lr.layer}: I(domain;expert) {lr.mi_bits:.3f} bits = {_pct(lr.mi_normalised)} "
                     f"of H(domain) (noise ~{lr.mi_noise_bits:.3f}), MaxVio {lr.max_vio:.3f}")
        lines.append(f"  {'':<{len(str(lr.layer)) + 7}}top-{TOP_N} share {tops} "
                     f"(uniform {_pct(lr.uniform_top_share)})")
    comparison = extra.get("comparison")
    if comparison:
        lines.append("comparison:")
        lines += [f"  {k}: {v}" for k, v in _flatten(comparison)[:8]]
    other = _other_summary_rows(extra)
    if other:
        lines.append("summary.json: " + ", ".join(f"{k} {v}" for k, v in other[:4]))
    return "\n".join(lines)


def _other_summary_rows(extra: dict[str, Any]) -> list[tuple[str, str]]:
    """summary.json entries the report has no section for (e.g. the demo's wall_time_s), flattened."""
    return _flatten({k: v for k, v in extra.items() if k not in KNOWN_SUMMARY_KEYS}) if extra else []


# --------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, -apple-system, sans-serif; margin: 2em auto; max-width: 1100px; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
pre { background: #f7f7f7; padding: 0.6em; white-space: pre-wrap; font-size: 0.9em; }
.note { color: #666; font-size: 0.88em; } .warn { color: #a00; font-weight: bold; }
"""

_FIGURE_TITLES = {
    "loss_by_domain": "Loss per domain",
    "max_vio": "MaxVio per layer",
    "expert_load": "Expert load (held-out)",
    "domain_expert": "Domain x expert routing (specialisation)",
    "bias_range": "Selection-bias range",
}


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> str:
    """An HTML table of already-escaped cells; the first `left` columns are left-aligned."""
    def cells(tag: str, row: list[str]) -> str:
        return "".join(f"<{tag}{' class=l' if i < left else ''}>{c}</{tag}>" for i, c in enumerate(row))
    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f"<table><tr>{cells('th', header)}</tr>{body}</table>"


def _img_src(path: Path, embed: bool) -> str:
    if embed:
        return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return html.escape(path.name)


def render_html(s: RunSummary, run: RunData, figures: dict[str, Path], embed: bool = False) -> str:
    e = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>widemoe report: {e(str(s.run_dir))}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>widemoe routing report</h1><p class=note>run directory: {e(str(s.run_dir.resolve()))}</p>"]
    if s.stopped:
        parts.append(f"<p class=warn>Training stopped: {e(s.stopped)}</p>")

    parts.append("<h2>Run</h2>")
    rows = [["model", e(_model_line(s))], ["steps", f"{s.steps:,}"], ["tokens", f"{s.tokens:,}"],
            ["tokens/s (median)", _count(s.tokens_per_s)], ["MFU (median)", _pct(s.mfu)],
            ["matmul peak MFU is against", "" if not s.peak_flops else f"{s.peak_flops / 1e9:.0f} GFLOP/s"],
            ["final train LM loss (last batch)",
             "n/a" if s.final_train_loss is None else f"{s.final_train_loss:.4f}"],
            ["held-out MaxVio, mean over layers", f"{s.heldout_max_vio_mean:.4f}"],
            ["dead experts (held-out, all layers)", str(s.dead_experts)],
            *[[e(k), e(v)] for k, v in _other_summary_rows(run.summary)]]
    parts.append(_table(["", "value"], rows, left=2))

    parts.append(f"<h2>Held-out loss per domain (step {s.eval_step})</h2>")
    rows = []
    for d, v in s.heldout_loss.items():
        uni = s.unigram_loss.get(d)
        rows.append([e(d), f"{v:.4f}", "n/a" if uni is None else f"{uni:.4f}",
                     "n/a" if uni is None else f"{uni - v:+.4f}"])
    parts.append(_table(["domain", "held-out loss (nats/token)", "unigram baseline", "gain over unigram"],
                        rows))

    domains = list(s.layers[0].domains) if s.layers else []
    parts.append("<h2>Routing per MoE layer (held-out set)</h2>")
    rows = []
    for lr in s.layers:
        rows.append([f"{lr.layer}", f"{lr.mi_bits:.4f}", _pct(lr.mi_normalised), f"{lr.mi_noise_bits:.4f}",
                     f"{s.heldout_max_vio.get(str(lr.layer), lr.max_vio):.4f}", str(lr.dead_experts),
                     *[_pct(lr.top_share.get(d)) for d in domains], _pct(lr.uniform_top_share)])
    parts.append(_table(["layer", "I(domain; expert) bits", "I / H(domain)", "noise floor bits", "MaxVio",
                         "dead experts", *[f"top-{TOP_N} share {e(d)}" for d in domains],
                         f"top-{TOP_N} uniform"], rows))
    h_dom = s.layers[0].h_domain_bits if s.layers else 0.0
    parts.append(f"<p class=note>I(domain; expert) is the mutual information of the joint distribution "
                 f"of (domain, chosen expert) over all token-expert assignments: 0 bits for a router that "
                 f"ignores the domain (a uniform router gives 0), H(domain) = {h_dom:.3f} bits for one that "
                 f"gives each domain its own experts. The noise floor is the expected value for a "
                 f"domain-blind router with this many assignments ((D-1)(E-1)/(2N ln 2)). "
                 f"Top-{TOP_N} share: fraction of a domain's assignments on its {TOP_N} most-used "
                 f"experts.</p>")

    parts.append("<h2>Figures</h2>")
    for name, path in figures.items():
        title = e(_FIGURE_TITLES.get(name, name))
        parts.append(f"<h3>{title}</h3><img src=\"{_img_src(path, embed)}\" alt=\"{title}\">")

    samples = run.summary.get("samples") or []
    if samples:
        parts.append("<h2>Sample generations</h2>")
        for smp in samples:
            if not isinstance(smp, dict):
                continue
            domain, prompt = e(str(smp.get("domain", ""))), e(str(smp.get("prompt", "")))
            completion = e(str(smp.get("completion", "")))
            parts.append(f"<p><b>{domain}</b></p><pre><b>{prompt}</b>{completion}</pre>")
    parts += _eval_section(run.run_dir)
    comparison = run.summary.get("comparison")
    if comparison:
        parts.append("<h2>Comparison</h2>")
        parts.append(_table(["", "value"], [[e(k), e(v)] for k, v in _flatten(comparison)], left=2))
    parts.append("<p class=note>Generated by <code>widemoe report</code> from metrics.jsonl"
                 f"{' and summary.json' if run.summary else ''}.</p></body></html>")
    return "\n".join(parts)


def _eval_section(run_dir: Path) -> list[str]:
    """The lm-eval scores of RUN/eval/ side by side (nothing when the run has none)."""
    scores = load_eval_scores(run_dir)
    if not scores:
        return []
    header, rows = score_rows(scores)
    return ["<h2>Evaluation (lm-eval, held-out tasks)</h2>",
            _table([html.escape(h) for h in header], [[html.escape(c) for c in r] for r in rows], left=2),
            "<p class=note>Written by <code>widemoe eval RUN</code> into RUN/eval/&lt;checkpoint&gt;/; "
            "<i>init</i> is the run's model at initialisation (<code>widemoe eval RUN --init</code>). "
            "Value ± standard error over n examples.</p>"]


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, embed: bool = False) -> ReportPaths:
    """Write the PNG figures and report.html for a run (default into RUN/report/); return their paths."""
    run = load_run(run_dir)
    s = summarise(run)  # raises ReportError when there is no eval record
    out = Path(out_dir) if out_dir is not None else run.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    n_layers = s.config.get("num_hidden_layers")
    drawn = {
        "loss_by_domain": plots.plot_loss_by_domain(run, out / "loss_by_domain.png"),
        "max_vio": plots.plot_max_vio(run, out / "max_vio.png"),
        "expert_load": plots.plot_expert_load(s.layers, out / "expert_load.png", s.eval_step, n_layers),
        "domain_expert": plots.plot_domain_expert(s.layers, out / "domain_expert.png", s.eval_step, n_layers),
        "bias_range": plots.plot_bias_range(run, out / "bias_range.png"),
    }
    figures = {k: v for k, v in drawn.items() if v is not None}
    for name, v in drawn.items():  # a rebuild must not leave a stale figure of an earlier version
        if v is None and (out / f"{name}.png").exists():
            (out / f"{name}.png").unlink()
    page = out / "report.html"
    page.write_text(render_html(s, run, figures, embed=embed), encoding="utf-8")
    return ReportPaths(html=page, figures=figures, warnings=run.warnings)
