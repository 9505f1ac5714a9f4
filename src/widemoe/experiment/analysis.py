"""From a suite's recorded runs to its conclusions: noise first, then each claim, then the compute multiplier.

`analyse(out_dir)` reads DIR/suite.toml, DIR/plan.json and DIR/results/*.json (see `runner`) and returns a
plain dict (the report's summary.json):

- noise: the pooled within-arm standard deviation of held-out loss, with its degrees of freedom, and each
  arm's own spread; every effect below is read against it.
- comparisons: each claim of the suite file as a difference b - a with its 95% t-interval, paired by seed
  when both arms ran the same seeds (the seed fixes the data order and the initialisation's random stream,
  so seed-level noise cancels) and Welch otherwise; Holm-adjusted p-values across the primary comparisons;
  the verdict by the rule written in the suite file.
- compute: for every MoE arm, how much dense compute reaches its held-out loss, interpolated on the dense
  ladder (arms without routing, at several step counts) in log FLOPs and in log training seconds. A loss
  beyond the ladder's ends gives a bound ("> 2.0"), not an extrapolation. Training seconds here are the
  run's tokens at its median step speed: a shared machine's passing stalls (summed step times) would
  otherwise decide the wall-clock ratio.
- arms: per arm the mean and spread of every recorded metric, FLOPs per token and achieved FLOP/s.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from widemoe.experiment.stats import (
    Difference,
    apply_holm,
    paired_difference,
    pooled_sd,
    verdict,
    welch_difference,
)
from widemoe.experiment.suite import Comparison, Suite, SuiteError, interleaved_runs, load_suite
from widemoe.report.analysis import ReportError  # the report's error: a directory it cannot use (exit 1)

ARM_METRICS = ("heldout_loss", "maxvio_batch", "maxvio_global", "dead_experts", "mi_bits", "tokens_per_s",
               "train_seconds")


def load_suite_dir(out: Path) -> tuple[Suite, dict[str, Any], list[dict[str, Any]]]:
    """The suite as run (its [quick] version when it ran quick), the plan and every recorded result."""
    if not (out / "plan.json").is_file() or not (out / "suite.toml").is_file():
        raise ReportError(f"{out}: not a suite output directory (no plan.json and suite.toml); "
                          "run `widemoe experiment SUITE --out DIR` first")
    plan = json.loads((out / "plan.json").read_text())
    try:
        suite = load_suite(out / "suite.toml")
    except SuiteError as e:
        raise ReportError(str(e)) from None
    if plan.get("quick"):
        suite = suite.quick()
    results = []
    for path in sorted((out / "results").glob("*.json")):
        try:
            results.append(json.loads(path.read_text()))
        except ValueError as e:
            raise ReportError(f"{path}: not a result record ({e})") from None
    if not results:
        raise ReportError(f"{out}/results: no recorded run yet")
    return suite, plan, results


def values_by_arm(results: list[dict[str, Any]], metric: str) -> dict[str, dict[int, float]]:
    """{arm: {seed: value}} of one metric (runs whose value is None, e.g. routing metrics of dense arms,
    are left out)."""
    out: dict[str, dict[int, float]] = {}
    for r in results:
        v = r["metrics"].get(metric)
        if v is not None:
            out.setdefault(r["arm"], {})[r["seed"]] = float(v)
    return out


def compare(c: Comparison, values: dict[str, dict[int, float]]) -> Difference | str:
    """The difference of one comparison, or the reason it cannot be computed (an arm without values)."""
    a, b = values.get(c.arm_a, {}), values.get(c.arm_b, {})
    for name, v in ((c.arm_a, a), (c.arm_b, b)):
        if len(v) < 2:
            return f"arm {name} has {len(v)} recorded value(s) of {c.metric}; an interval needs 2 or more"
    if set(a) == set(b):
        return paired_difference(a, b, arm_a=c.arm_a, arm_b=c.arm_b)
    return welch_difference(list(a.values()), list(b.values()), arm_a=c.arm_a, arm_b=c.arm_b)


def judge(suite: Suite, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each comparison of the suite: difference, interval, p (Holm-adjusted for the primary ones), verdict."""
    diffs: dict[str, Difference | str] = {}
    for c in suite.comparisons:
        diffs[c.name] = compare(c, values_by_arm(results, c.metric))
    primary = [c.name for c in suite.comparisons if c.primary and isinstance(diffs[c.name], Difference)]
    for name, d in zip(primary, apply_holm([diffs[n] for n in primary]), strict=True):  # type: ignore[misc]
        diffs[name] = d
    out = []
    for c in suite.comparisons:
        d = diffs[c.name]
        row: dict[str, Any] = {"name": c.name, "claim": c.claim, "arm_a": c.arm_a, "arm_b": c.arm_b,
                               "metric": c.metric, "direction": c.direction, "margin": c.margin,
                               "primary": c.primary}
        if isinstance(d, str):
            row.update(verdict="not computed", reason=d)
        else:
            row.update(estimate=d.estimate, ci_low=d.ci_low, ci_high=d.ci_high, p_value=d.p_value,
                       p_holm=d.p_holm, n_a=d.n_a, n_b=d.n_b, method=d.method, df=d.df,
                       verdict=verdict(d, c.rule))
        out.append(row)
    return out


def arm_table(suite: Suite, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm (file order): seeds, mean and sample SD of each metric, per-domain losses, FLOPs, shape."""
    rows = []
    for arm in suite.arms:
        runs = sorted((r for r in results if r["arm"] == arm.name), key=lambda r: r["seed"])
        if not runs:
            continue
        cfg = runs[0]["model_config"]
        row: dict[str, Any] = {"arm": arm.name, "seeds": [r["seed"] for r in runs],
                               "steps": runs[0]["train_config"]["steps"],
                               "tokens": runs[0]["train_config"]["steps"] * _tokens_per_step(runs[0]),
                               "flops_per_token": runs[0]["flops_per_token"],
                               "routed": runs[0]["metrics"]["maxvio_global"] is not None,
                               "experts": cfg["n_routed_experts"], "top_k": cfg["num_experts_per_tok"],
                               "shared": cfg["n_shared_experts"],
                               "balance": runs[0]["train_config"]["balance"]}
        for m in ARM_METRICS:
            vals = [r["metrics"][m] for r in runs if r["metrics"].get(m) is not None]
            row[m] = _mean_sd(vals)
        domains = runs[0]["metrics"]["heldout_loss_by_domain"]
        row["heldout_loss_by_domain"] = {
            d: _mean_sd([r["metrics"]["heldout_loss_by_domain"][d] for r in runs]) for d in domains}
        fps = [r["flops_per_token"] * r["metrics"]["tokens_per_s"] for r in runs if r["flops_per_token"]]
        row["flops_per_s"] = _mean_sd(fps)
        rows.append(row)
    return rows


def _tokens_per_step(r: dict[str, Any]) -> int:
    tc = r["train_config"]
    return tc["batch_size"] * tc["seq_len"] * tc["grad_accum"]


def _mean_sd(vals: list[float]) -> dict[str, float | None] | None:
    if not vals:
        return None
    x = np.asarray(vals, dtype=float)
    return {"mean": float(x.mean()), "sd": float(x.std(ddof=1)) if x.size > 1 else None, "n": int(x.size)}


def noise(results: list[dict[str, Any]]) -> dict[str, Any]:
    groups = {arm: list(v.values()) for arm, v in values_by_arm(results, "heldout_loss").items()}
    try:
        sd, df = pooled_sd(groups)
    except ValueError as e:
        return {"pooled_sd": None, "df": 0, "reason": str(e)}
    return {"pooled_sd": sd, "df": df, "arms": len([g for g in groups.values() if len(g) > 1])}


def compute_multiplier(arms: list[dict[str, Any]]) -> dict[str, Any]:
    """Dense compute (FLOPs, training seconds) that reaches each MoE arm's mean held-out loss, as a
    multiple of the MoE arm's own: interpolated on the dense ladder in log compute."""
    dense = sorted((a for a in arms if not a["routed"]), key=lambda a: a["tokens"])
    if len(dense) < 2:
        return {"ladder": [], "arms": {}, "reason": "fewer than 2 dense arms: no ladder to read against"}
    ladder = [{"arm": a["arm"], "flops": a["flops_per_token"] * a["tokens"], "seconds": _seconds(a),
               "loss": a["heldout_loss"]["mean"]} for a in dense]
    dense_rate = [a["flops_per_s"]["mean"] for a in dense if a.get("flops_per_s")]
    out: dict[str, Any] = {}
    for a in arms:
        if not a["routed"]:
            continue
        loss = a["heldout_loss"]["mean"]
        own = {"flops": a["flops_per_token"] * a["tokens"], "seconds": _seconds(a)}
        out[a["arm"]] = {k: _read_ladder(ladder, k, loss, own[k]) for k in ("flops", "seconds")}
        if dense_rate and a.get("flops_per_s"):  # the MoE layer's cost per FLOP on this machine
            out[a["arm"]]["speed_vs_dense"] = a["flops_per_s"]["mean"] / float(np.mean(dense_rate))
    return {"ladder": ladder, "arms": out}


def _seconds(arm: dict[str, Any]) -> float:
    """Training seconds of an arm at its median step speed (mean over seeds)."""
    return arm["tokens"] / arm["tokens_per_s"]["mean"]


def _read_ladder(ladder: list[dict[str, Any]], key: str, loss: float, own: float) -> dict[str, Any]:
    """Interpolate log(compute) against loss between the two ladder points that bracket `loss`."""
    pts = sorted(ladder, key=lambda p: p[key])
    losses = [p["loss"] for p in pts]
    if loss < min(losses):
        best = min(pts, key=lambda p: p["loss"])
        return {"bound": "greater", "ratio": best[key] / own}
    if loss > max(losses):
        worst = max(pts, key=lambda p: p["loss"])
        return {"bound": "less", "ratio": worst[key] / own}
    for p, q in zip(pts, pts[1:]):  # first segment that brackets the loss, in compute order
        lo, hi = sorted((p["loss"], q["loss"]))
        if lo <= loss <= hi and p["loss"] != q["loss"]:
            t = (loss - p["loss"]) / (q["loss"] - p["loss"])
            log_c = math.log(p[key]) + t * (math.log(q[key]) - math.log(p[key]))
            return {"bound": None, "ratio": math.exp(log_c) / own}
    return {"bound": None, "ratio": pts[0][key] / own}


def analyse(out: Path) -> dict[str, Any]:
    suite, plan, results = load_suite_dir(out)
    planned = [r.run_id for r in interleaved_runs(suite, plan.get("seeds"))]
    recorded = {r["run_id"] for r in results}
    arms = arm_table(suite, results)
    commits = sorted({r["commit"] for r in results})
    return {
        "suite": suite.name, "description": suite.description, "quick": suite.is_quick,
        "planned_runs": len(planned), "recorded_runs": len(recorded),
        "missing_runs": [r for r in planned if r not in recorded],
        "commits": commits, "dirty": any(r.get("dirty") for r in results), "host": results[0]["host"],
        "train_seconds_total": sum(r["metrics"]["train_seconds"] for r in results),
        "wall_seconds_total": sum(r["wall_seconds"] for r in results),
        "noise": noise(results), "comparisons": judge(suite, results), "arms": arms,
        "compute": compute_multiplier(arms),
    }


__all__ = ["ARM_METRICS", "ReportError", "analyse", "arm_table", "compare", "compute_multiplier", "judge",
           "load_suite_dir", "noise", "values_by_arm"]
