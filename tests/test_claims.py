"""The paired statistics of claims.py against scipy's own tests and hand-worked cases,
and on synthetic seeds with known effects: a paired test must find a small effect under a
large shared seed spread, say nothing of no effect, and turn on the opposite one."""
import math

import numpy as np
import pytest
from scipy import stats

import claims


def test_paired_difference_is_scipys_paired_t_test():
    a, b = [21.0, 24.5, 22.1, 23.3], [20.1, 23.9, 21.5, 22.0]
    d = claims.paired_difference(a, b)
    reference = stats.ttest_rel(a, b)
    assert d["p"] == pytest.approx(reference.pvalue, rel=1e-10) and d["n"] == 4
    diffs = np.subtract(a, b)
    half = stats.t.ppf(0.975, 3) * diffs.std(ddof=1) / 2
    assert (d["low"], d["high"]) == pytest.approx((diffs.mean() - half, diffs.mean() + half), rel=1e-12)
    one = claims.paired_difference([1.0], [0.0])
    assert one["p"] == 1.0 and one["low"] == -math.inf               # one seed decides nothing


def test_holm_step_down():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> monotone 0.06
    assert claims.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert claims.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])       # capped at 1


def test_equivalence_is_two_one_sided_t_tests():
    d = np.array([0.1, -0.12, 0.05, -0.04, 0.02])
    for margin in (0.05, 0.2, 0.5):
        reference = max(stats.ttest_1samp(d, -margin, alternative="greater").pvalue,
                        stats.ttest_1samp(d, margin, alternative="less").pvalue)
        assert claims.equivalence(d, np.zeros(5), margin) == pytest.approx(reference, rel=1e-10)
    assert claims.equivalence(d, np.zeros(5), 0.5) < 0.01 and claims.equivalence(d, np.zeros(5), 0.02) > 0.3


def test_steps_to_threshold_interpolates_the_first_crossing():
    steps, values = [500, 1000, 1500], [0.2, 0.6, 0.9]
    assert claims.steps_to_threshold(steps, values, 0.4) == pytest.approx(750)
    assert claims.steps_to_threshold(steps, values, 0.1) == 500
    assert claims.steps_to_threshold(steps, values, 0.95) == math.inf
    assert claims.steps_to_threshold(steps, [5.0, 3.0, 2.0], 4.0, higher_is_better=False) == pytest.approx(750)


def test_verdicts_on_seeds_with_known_effects():
    """Three seeds whose PSNR spreads 3 dB between seeds (shared by the paired variants) and
    a 0.5 dB effect: paired, reproduced; its opposite, contradicted; no effect, not resolved.
    An unpaired rule ('difference larger than the seed spread') would call the first mixed."""
    rng = np.random.default_rng(0)
    base = np.array([20.0, 23.0, 26.0])
    noise = lambda: rng.normal(0, 0.05, 3)
    full = base + 0.5 + noise()
    cases = {"effect": base + noise(), "opposite": base + 1.0 + noise(), "none": full + rng.normal(0, 0.3, 3)}
    differences = {k: claims.paired_difference(full, v) for k, v in cases.items()}
    adjusted = dict(zip(differences, claims.holm([d["p"] for d in differences.values()])))
    found = {k: claims.verdict(differences[k], adjusted[k], claimed_sign=+1) for k in cases}
    assert found["effect"] == "reproduced" and found["opposite"] == "contradicted"
    assert found["none"].startswith("not resolved at this power")
    assert abs(full.mean() - cases["effect"].mean()) < full.std(ddof=1)          # the unpaired rule's blind spot
