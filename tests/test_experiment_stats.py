"""The statistics of `widemoe experiment report` on synthetic data with known effects (issue 14).

Coverage of the 95% intervals is checked by simulation (fixed numpy seeds, so the counts are exact),
Holm against a hand-computed example, the verdict rules on a clear effect, a null and a straddle.
"""

import math

import numpy as np
import pytest
from scipy import stats as sps

from widemoe.experiment.stats import (
    Difference,
    Rule,
    apply_holm,
    holm,
    paired_difference,
    pooled_sd,
    verdict,
    welch_difference,
)

TRUE_DIFF = -0.02  # nats: b is better than a by about the size of a published MoE effect
N_SIMULATIONS = 200


def _simulate_paired(rng: np.random.Generator, n_seeds: int) -> tuple[dict, dict]:
    # A shared per-seed effect (data order) much larger than the arm-specific noise: pairing removes it.
    seed_effect = rng.normal(0.0, 0.03, n_seeds)
    a = 2.0 + seed_effect + rng.normal(0.0, 0.01, n_seeds)
    b = 2.0 + TRUE_DIFF + seed_effect + rng.normal(0.0, 0.01, n_seeds)
    return dict(enumerate(a.tolist())), dict(enumerate(b.tolist()))


def test_paired_interval_covers_the_true_difference_about_95_percent() -> None:
    rng = np.random.default_rng(1401)
    covered = 0
    for _ in range(N_SIMULATIONS):
        a, b = _simulate_paired(rng, n_seeds=3)
        d = paired_difference(a, b)
        covered += d.ci_low <= TRUE_DIFF <= d.ci_high
    assert 0.90 * N_SIMULATIONS <= covered <= 0.99 * N_SIMULATIONS, covered


def test_welch_interval_covers_the_true_difference_about_95_percent() -> None:
    rng = np.random.default_rng(1402)
    covered = 0
    for _ in range(N_SIMULATIONS):
        # Unequal sizes and spreads: the case Welch's df is for (a pooled-variance t would miscover).
        a = rng.normal(2.0, 0.01, 6)
        b = rng.normal(2.0 + TRUE_DIFF, 0.04, 3)
        d = welch_difference(a.tolist(), b.tolist())
        covered += d.ci_low <= TRUE_DIFF <= d.ci_high
    assert 0.90 * N_SIMULATIONS <= covered <= 0.99 * N_SIMULATIONS, covered


def test_pairing_gives_a_narrower_interval_when_the_seed_effect_is_shared() -> None:
    rng = np.random.default_rng(1403)
    paired_widths, welch_widths = [], []
    for _ in range(50):
        a, b = _simulate_paired(rng, n_seeds=5)
        p = paired_difference(a, b)
        w = welch_difference(list(a.values()), list(b.values()))
        paired_widths.append(p.ci_high - p.ci_low)
        welch_widths.append(w.ci_high - w.ci_low)
    assert np.median(paired_widths) < 0.6 * np.median(welch_widths)


def test_paired_and_welch_agree_with_scipy() -> None:
    a = {0: 2.10, 1: 2.05, 2: 2.12, 3: 2.08}
    b = {0: 2.07, 1: 2.04, 2: 2.08, 3: 2.06, 9: 1.0}  # seed 9 has no partner: ignored
    d = paired_difference(a, b, arm_a="E8k2", arm_b="E32k8")
    ref = sps.ttest_rel([b[s] for s in range(4)], [a[s] for s in range(4)])
    assert (d.n_a, d.n_b, d.method, d.arm_b) == (4, 4, "paired", "E32k8")
    assert d.estimate == pytest.approx(-0.025)
    assert d.p_value == pytest.approx(ref.pvalue)
    ci = ref.confidence_interval(0.95)
    assert (d.ci_low, d.ci_high) == (pytest.approx(ci.low), pytest.approx(ci.high))

    xa, xb = [2.10, 2.05, 2.12, 2.08], [2.07, 2.04, 2.08]
    w = welch_difference(xa, xb)
    ref = sps.ttest_ind(xb, xa, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert w.estimate == pytest.approx(np.mean(xb) - np.mean(xa))
    assert w.p_value == pytest.approx(ref.pvalue)
    assert w.df == pytest.approx(ref.df)
    assert (w.ci_low, w.ci_high) == (pytest.approx(ci.low), pytest.approx(ci.high))


def test_pooled_sd_by_hand() -> None:
    # Arm x: mean 2, squares 1+0+1 = 2 (df 2); arm y: mean 5, squares 1+1 = 2 (df 1); z: one value, skipped.
    sd, df = pooled_sd({"x": [1.0, 2.0, 3.0], "y": [4.0, 6.0], "z": [100.0]})
    assert df == 3
    assert sd == pytest.approx(math.sqrt((2.0 + 2.0) / 3))


def test_pooled_sd_recovers_the_true_noise() -> None:
    rng = np.random.default_rng(1404)
    groups = {f"arm{i}": rng.normal(2.0 + 0.1 * i, 0.02, 3).tolist() for i in range(200)}
    sd, df = pooled_sd(groups)
    assert df == 400
    assert sd == pytest.approx(0.02, rel=0.1)


def test_holm_by_hand() -> None:
    # Sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # 0.5*2 = 1.0 caps, and 0.6 may not drop below it
    assert holm([0.2]) == [0.2]
    assert holm([]) == []
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        holm([0.1, 1.5])


def test_apply_holm_fills_p_holm_and_changes_a_verdict() -> None:
    rule = Rule("granularity", "lower_is_better", margin=0.005)
    base = Difference("a", "b", -0.02, -0.035, -0.005, 0.02, 3, 3, "paired", 2.0)
    others = [Difference("a", f"c{i}", 0.0, -0.01, 0.01, 0.9, 3, 3, "paired", 2.0) for i in range(3)]
    assert verdict(base, rule) == "supported"  # alone, p = 0.02 < 0.05
    adjusted = apply_holm([base, *others])
    assert adjusted[0].p_holm == pytest.approx(0.08)
    assert base.p_holm is None  # the inputs are left alone
    assert verdict(adjusted[0], rule) == "inconclusive"  # in a family of 4 it no longer reaches 0.05


def _diff(low: float, high: float, p: float) -> Difference:
    return Difference("a", "b", (low + high) / 2, low, high, p, 3, 3, "paired", 2.0, p_holm=p)


@pytest.mark.parametrize(
    ("low", "high", "p", "direction", "expected"),
    [
        (-0.04, -0.01, 0.01, "lower_is_better", "supported"),  # clear effect in the claimed direction
        (0.01, 0.04, 0.01, "higher_is_better", "supported"),
        (-0.003, 0.004, 0.6, "lower_is_better", "not supported at this scale"),  # null: inside the band
        (0.01, 0.04, 0.01, "lower_is_better", "not supported at this scale"),  # the opposite effect
        (-0.03, 0.01, 0.3, "lower_is_better", "inconclusive"),  # straddles zero and the band
        (-0.004, 0.008, 0.4, "lower_is_better", "inconclusive"),  # straddles the band's upper edge
    ],
)
def test_verdict_rules(low: float, high: float, p: float, direction: str, expected: str) -> None:
    assert verdict(_diff(low, high, p), Rule("claim", direction, margin=0.005)) == expected


def test_verdicts_on_simulated_experiments() -> None:
    rng = np.random.default_rng(1405)
    rule = Rule("shared expert", "lower_is_better", margin=0.005)

    def run(true_diff: float, noise: float, n: int) -> str:
        a = rng.normal(2.0, noise, n)
        b = a + true_diff + rng.normal(0.0, noise, n)
        return verdict(paired_difference(dict(enumerate(a)), dict(enumerate(b))), rule)

    assert run(-0.05, 0.005, 5) == "supported"
    assert run(0.0, 0.0005, 5) == "not supported at this scale"
    assert run(-0.01, 0.03, 3) == "inconclusive"


def test_errors_name_the_rule() -> None:
    with pytest.raises(ValueError, match="at least 2 common seeds"):
        paired_difference({0: 1.0, 1: 1.1}, {1: 1.0, 2: 1.2})
    with pytest.raises(ValueError, match=r"arm 'b' has 1 value.*at least 2 values"):
        welch_difference([1.0, 1.1], [1.0], arm_b="b")
    with pytest.raises(ValueError, match="no arm has 2 or more values"):
        pooled_sd({"x": [1.0], "y": [2.0]})
    with pytest.raises(ValueError, match="direction must be"):
        Rule("claim", "lower", margin=0.01)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="margin must be >= 0"):
        Rule("claim", "lower_is_better", margin=-0.01)
    with pytest.raises(ValueError, match="level must be in"):
        welch_difference([1.0, 1.1], [1.0, 1.2], level=95)
