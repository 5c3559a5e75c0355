"""
Paired statistics that turn per-seed results into verdicts on the paper's claims: the
ablation sweep (ablations.py) compares variants trained from the same seeds (the same
stand-in, stage 1, data order and sampling noise), so each claim is read on the per-seed
differences, not on two independent spreads.

- paired_difference: the mean of the per-seed differences with its t interval and a
  two-sided p-value (a one-sample t test of the differences against 0);
- holm: Holm's step-down correction of the p-values of several pre-registered claims;
- equivalence: two one-sided tests (TOST) for an "about equal" claim within a margin;
- steps_to_threshold: where a convergence curve first reaches a value, for speed-up ratios;
- verdict: reproduced / contradicted / not resolved at this power.
"""
import math

import numpy as np
from scipy import stats


def paired_difference(a, b, level=0.95):
    """Per-seed differences a_i - b_i: dict(mean, low, high, p, n). With one pair, or no
    spread at all, the interval is unbounded and p is 1 unless the differences are exactly
    nonzero and equal (then p is 0): n = 1 decides nothing."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n, mean = len(d), float(d.mean()) if len(d) else math.nan
    if n < 2:
        return dict(mean=mean, low=-math.inf, high=math.inf, p=1.0, n=n)
    sd = float(d.std(ddof=1))
    if sd == 0:
        return dict(mean=mean, low=mean, high=mean, p=0.0 if mean != 0 else 1.0, n=n)
    se = sd / math.sqrt(n)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * se
    p = 2 * stats.t.sf(abs(mean) / se, n - 1)
    return dict(mean=mean, low=mean - half, high=mean + half, p=float(p), n=n)


def holm(p_values):
    """Holm's step-down adjusted p-values, in the input order: the k-th smallest of m is
    multiplied by (m - k + 1), then made non-decreasing and capped at 1."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def equivalence(a, b, margin):
    """TOST p-value that the mean per-seed difference lies within (-margin, margin): the
    larger of the two one-sided t tests' p-values (equivalent when below alpha)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    if n < 2:
        return 1.0
    se = float(d.std(ddof=1)) / math.sqrt(n)
    if se == 0:
        return 0.0 if abs(float(d.mean())) < margin else 1.0
    lower = stats.t.sf((d.mean() + margin) / se, n - 1)     # H0: mean <= -margin
    upper = stats.t.cdf((d.mean() - margin) / se, n - 1)    # H0: mean >= +margin
    return float(max(lower, upper))


def steps_to_threshold(steps, values, threshold, higher_is_better=True):
    """The training step at which a curve first reaches `threshold`, linearly
    interpolated between the measured budgets; inf if it never does."""
    sign = 1 if higher_is_better else -1
    previous = None
    for step, value in zip(steps, values):
        if sign * value >= sign * threshold:
            if previous is None:
                return float(step)
            (s0, v0) = previous
            return float(s0 + (step - s0) * (threshold - v0) / (value - v0))
        previous = (step, value)
    return math.inf


def verdict(difference, p_adjusted, claimed_sign, alpha=0.05):
    """One of reproduced / contradicted / not resolved at this power, for a claim that
    the paired difference has claimed_sign (+1 or -1), given its corrected p-value."""
    if p_adjusted < alpha and math.copysign(1, difference["mean"]) == claimed_sign:
        return "reproduced"
    if p_adjusted < alpha:
        return "contradicted"
    return f"not resolved at this power (n={difference['n']})"
