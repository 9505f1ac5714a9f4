"""The lm-eval scores of a run: `RUN/eval/<checkpoint>/results_<date>.json` as `widemoe eval` writes them
(lm-eval's own results JSON), read into task -> metric -> value per evaluated checkpoint, and shown as one
side-by-side table (the model at initialisation first, then the checkpoints by step).

lm-eval keys a metric as "<metric>,<filter>" ("acc,none", "exact_match,strip") with "<metric>_stderr,
<filter>" beside it; the table names the metric alone, and the filter too when a task has two filters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from widemoe.report.analysis import ReportError

EVAL_DIR = "eval"
INIT_LABEL = "init"  # written by `widemoe eval RUN --init` (widemoe.evals.runner.INIT_LABEL)


@dataclass(frozen=True)
class Score:
    value: float
    stderr: float | None
    n: int | None  # examples evaluated


# {checkpoint label: {task: {metric: Score}}}
Scores = dict[str, dict[str, dict[str, Score]]]


def newest_results(directory: Path) -> Path | None:
    """The newest `results_<date>.json` in `directory` (lm-eval's date ids sort in time order)."""
    found = sorted(directory.glob("results_*.json"))
    return found[-1] if found else None


def task_scores(results: dict) -> dict[str, dict[str, Score]]:
    """task -> metric -> Score from an lm-eval results dict."""
    out: dict[str, dict[str, Score]] = {}
    for task, entries in sorted((results.get("results") or {}).items()):
        keys = [k for k in entries if "," in k and "_stderr," not in k]
        filters = {k.split(",", 1)[1] for k in keys}
        metrics: dict[str, Score] = {}
        for key in keys:
            value = entries[key]
            if not isinstance(value, (int, float)):
                continue
            metric, flt = key.split(",", 1)
            stderr = entries.get(f"{metric}_stderr,{flt}")
            n = entries.get("sample_len")
            metrics[metric if len(filters) == 1 else f"{metric} ({flt})"] = Score(
                float(value), float(stderr) if isinstance(stderr, (int, float)) else None,
                int(n) if isinstance(n, int) else None)
        out[task] = metrics
    return out


def _order(label: str) -> tuple[int, str]:
    return (0 if label == INIT_LABEL else 1, label)


def load_eval_scores(run_dir: str | Path) -> Scores:
    """Scores per evaluated checkpoint of a run ({} when RUN/eval/ holds none)."""
    root = Path(run_dir) / EVAL_DIR
    if not root.is_dir():
        return {}
    scores: Scores = {}
    for d in sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: _order(p.name)):
        path = newest_results(d)
        if path is None:
            continue
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ReportError(f"{path}: not a readable lm-eval results JSON ({e})") from None
        if not isinstance(results, dict):
            raise ReportError(f"{path}: expected lm-eval's results object at the top level")
        scores[d.name] = task_scores(results)
    return scores


def score_rows(scores: Scores) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the side-by-side table: task, metric, n, then one column per checkpoint
    ("0.345 ± 0.034"; "-" where a checkpoint lacks the task)."""
    labels = list(scores)
    keys = list(dict.fromkeys((t, m) for per in scores.values() for t, ms in per.items() for m in ms))
    rows = []
    for task, metric in keys:
        cells, n = [], None
        for label in labels:
            s = scores[label].get(task, {}).get(metric)
            n = n or (s.n if s else None)
            err = "" if s is None or s.stderr is None else f" ± {s.stderr:.3f}"
            cells.append("-" if s is None else f"{s.value:.3f}{err}")
        rows.append([task, metric, "" if n is None else str(n), *cells])
    return ["task", "metric", "n", *labels], rows


def scores_text(scores: Scores) -> str:
    """The side-by-side table as aligned plain text ('' when there are no scores)."""
    if not scores:
        return ""
    header, rows = score_rows(scores)
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in table]
    return "\n".join(line.rstrip() for line in lines)


__all__ = ["EVAL_DIR", "Score", "Scores", "load_eval_scores", "newest_results", "score_rows", "scores_text",
           "task_scores"]
