"""The statistics behind `widemoe experiment report`: noise first, then differences, Holm, verdicts.

At this scale seed-to-seed noise of held-out loss (~0.01-0.03 nats) is as large as most published MoE
effects, so every claim is judged on a difference with its confidence interval, never on two means:

- `pooled_sd`: the within-arm noise of the suite, pooled over arms.
- `paired_difference`: arms run with the same seeds (same data order), compared seed by seed.
- `welch_difference`: arms whose seeds do not pair, compared with Welch's unequal-variance t.
- `holm` / `apply_holm`: Holm-Bonferroni adjusted p-values across the suite's primary comparisons.
- `Rule` / `verdict`: the decision written in the suite file before it runs.

Intervals are the unadjusted t-intervals at `level` (95% by default); only the p-values are adjusted for
multiplicity. A difference is always "b minus a". Pure numpy/scipy: no torch, no training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from scipy import stats as sps

Method = Literal["paired", "welch"]
Direction = Literal["lower_is_better", "higher_is_better"]
VERDICTS = ("supported", "not supported at this scale", "inconclusive")


def pooled_sd(groups: dict[str, list[float]]) -> tuple[float, int]:
    """Pooled within-arm standard deviation and its degrees of freedom.

    s_p^2 = sum_i (n_i - 1) s_i^2 / sum_i (n_i - 1),  df = sum_i (n_i - 1),
    with s_i^2 the unbiased variance of arm i. Arms with one value have no within-arm spread and
    contribute nothing (n_i - 1 = 0). Raises ValueError if no arm has 2 or more values.
    """
    sum_sq, df = 0.0, 0
    for values in groups.values():
        x = np.asarray(values, dtype=float)
        if x.size >= 2:
            sum_sq += float(np.sum((x - x.mean()) ** 2))
            df += x.size - 1
    if df == 0:
        raise ValueError(
            f"pooled_sd: no arm has 2 or more values (arms: {sorted(groups)}); "
            "a noise estimate needs at least one arm with 2+ seeds"
        )
    return math.sqrt(sum_sq / df), df


@dataclass(frozen=True)
class Difference:
    """One comparison: estimate = mean(b) - mean(a) (Welch) or mean over seeds of b - a (paired).

    ci_low/ci_high: the unadjusted t-interval at the level it was computed with; p_value: two-sided,
    unadjusted; p_holm: the Holm-adjusted p-value, filled by `apply_holm` for primary comparisons.
    """

    arm_a: str
    arm_b: str
    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    n_a: int
    n_b: int
    method: Method
    df: float
    p_holm: float | None = None


def _t_summary(estimate: float, se: float, df: float, level: float) -> tuple[float, float, float]:
    """Interval estimate +- t_{(1+level)/2, df} * se and two-sided p = 2 * P(T_df > |estimate / se|).

    se == 0 (identical differences) gives a zero-width interval and p = 0 unless the estimate is 0.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if se == 0.0:
        return estimate, estimate, (1.0 if estimate == 0.0 else 0.0)
    half = float(sps.t.ppf((1.0 + level) / 2.0, df)) * se
    p = float(2.0 * sps.t.sf(abs(estimate) / se, df))
    return estimate - half, estimate + half, min(1.0, p)


def paired_difference(
    a: dict[int, float], b: dict[int, float], level: float = 0.95, arm_a: str = "a", arm_b: str = "b"
) -> Difference:
    """Paired difference by seed: d_s = b[s] - a[s] over the seeds present in both arms.

    estimate = mean(d), se = sd(d) / sqrt(n), df = n - 1, interval estimate +- t_{(1+level)/2, n-1} se.
    Use it when the seed fixes the data order, so seed-level noise cancels in d_s. Seeds in only one arm
    are ignored. Raises ValueError with fewer than 2 common seeds.
    """
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        raise ValueError(
            f"paired_difference({arm_a}, {arm_b}): {len(seeds)} seed(s) in both arms "
            f"(a: {sorted(a)}, b: {sorted(b)}); a paired interval needs at least 2 common seeds"
        )
    d = np.array([b[s] - a[s] for s in seeds], dtype=float)
    n = d.size
    estimate = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(n)
    low, high, p = _t_summary(estimate, se, n - 1, level)
    return Difference(arm_a, arm_b, estimate, low, high, p, n, n, "paired", float(n - 1))


def welch_difference(
    a: list[float], b: list[float], level: float = 0.95, arm_a: str = "a", arm_b: str = "b"
) -> Difference:
    """Welch difference of means: estimate = mean(b) - mean(a), no equal-variance assumption.

    se^2 = s_a^2/n_a + s_b^2/n_b; Welch-Satterthwaite
    df = se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1)); interval estimate +- t_{(1+level)/2, df} se.
    Raises ValueError if either arm has fewer than 2 values (no variance to estimate).
    """
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    for name, x in ((arm_a, xa), (arm_b, xb)):
        if x.size < 2:
            raise ValueError(
                f"welch_difference({arm_a}, {arm_b}): arm {name!r} has {x.size} value(s); "
                "Welch's interval needs at least 2 values in each arm"
            )
    va, vb = float(xa.var(ddof=1)) / xa.size, float(xb.var(ddof=1)) / xb.size
    se = math.sqrt(va + vb)
    # With both variances zero df is undefined; _t_summary does not use it then.
    df = (va + vb) ** 2 / (va**2 / (xa.size - 1) + vb**2 / (xb.size - 1)) if se > 0 else float("nan")
    estimate = float(xb.mean() - xa.mean())
    low, high, p = _t_summary(estimate, se, df, level)
    return Difference(arm_a, arm_b, estimate, low, high, p, int(xa.size), int(xb.size), "welch", df)


def holm(p_values: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order.

    With p_(1) <= ... <= p_(m) sorted ascending: p~_(i) = min(1, max_{j <= i} (m - j + 1) p_(j)).
    Rejecting where p~ < alpha controls the family-wise error rate at alpha; the adjusted values are
    monotone in the raw ones and never exceed 1.
    """
    p = np.asarray(p_values, dtype=float)
    if p.size and (np.isnan(p).any() or p.min() < 0.0 or p.max() > 1.0):
        raise ValueError(f"holm: p-values must lie in [0, 1], got {list(p_values)}")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = (m - np.arange(m)) * p[order]
    adjusted_sorted = np.minimum(1.0, np.maximum.accumulate(scaled))
    adjusted = np.empty(m)
    adjusted[order] = adjusted_sorted
    return [float(x) for x in adjusted]


def apply_holm(diffs: list[Difference]) -> list[Difference]:
    """Copies of `diffs` (one family: the suite's primary comparisons) with p_holm filled in."""
    adjusted = holm([d.p_value for d in diffs])
    return [replace(d, p_holm=q) for d, q in zip(diffs, adjusted, strict=True)]


@dataclass(frozen=True)
class Rule:
    """A claim's decision rule, written in the suite file before the suite runs.

    direction: which sign of (b - a) the claim predicts: "lower_is_better" claims b - a < 0 (e.g. loss),
    "higher_is_better" claims b - a > 0. margin: the practical-equivalence bound in the metric's units
    (e.g. nats); differences inside [-margin, +margin] are too small to matter at this scale.
    """

    comparison: str
    direction: Direction
    margin: float

    def __post_init__(self) -> None:
        if self.direction not in ("lower_is_better", "higher_is_better"):
            raise ValueError(
                f"rule {self.comparison!r}: direction must be 'lower_is_better' or 'higher_is_better', "
                f"got {self.direction!r}"
            )
        if not self.margin >= 0.0:
            raise ValueError(f"rule {self.comparison!r}: margin must be >= 0, got {self.margin}")


def verdict(diff: Difference, rule: Rule, alpha: float = 0.05) -> str:
    """Judge one difference (b - a) by its rule; the first matching line wins:

    1. "supported": the interval lies entirely beyond zero in the claimed direction (ci_high < 0 for
       lower_is_better, ci_low > 0 for higher_is_better) and p < alpha, where p is p_holm when the
       difference belongs to the Holm family (p_holm set) and the raw p-value otherwise (a family of one).
       A significant effect smaller than the margin is still "supported": the margin only decides nulls.
    2. "not supported at this scale": the interval lies entirely inside [-margin, +margin] (equivalence:
       any effect is too small to matter), or entirely on the wrong side of zero (the opposite effect).
    3. "inconclusive": anything else (the interval straddles zero or the band's edge, or the interval
       excludes zero but the Holm-adjusted p does not reach alpha).
    """
    sign = -1.0 if rule.direction == "lower_is_better" else 1.0
    # In "claimed" units a positive value means the claim's direction.
    low, high = sorted((sign * diff.ci_low, sign * diff.ci_high))
    p = diff.p_holm if diff.p_holm is not None else diff.p_value
    if low > 0.0 and p < alpha:
        return "supported"
    if -rule.margin <= diff.ci_low and diff.ci_high <= rule.margin:
        return "not supported at this scale"
    if high < 0.0:
        return "not supported at this scale"
    return "inconclusive"
