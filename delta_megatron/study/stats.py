"""The study's statistics: bootstrap confidence intervals, one-sided Mann–Whitney U, Vargha–Delaney A
and Holm's step-down correction. scipy does the statistics; this module only orients them ("higher is
better" or not) and handles the corner cases a small study hits (constant samples, runs that never
reach a threshold).

Why these: seeds are few (8–16) and RL outcomes are not normal, so the CI is a bootstrap (BCa, the
percentile interval where BCa is undefined) and the test is rank-based. A is the effect size that goes
with U: the probability that a run of the method beats a run of the baseline (ties count half), 0.5 =
no effect; Vargha & Delaney call 0.56 / 0.64 / 0.71 small / medium / large. Holm controls the
family-wise error over the methods compared to one baseline on one metric.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass
class Interval:
    value: float
    low: float
    high: float


def bootstrap_ci(values: Sequence[float], statistic: Callable = np.mean, level: float = 0.95,
                 n_resamples: int = 9999, seed: int = 0) -> Interval:
    """``statistic`` (a numpy reduction taking ``axis``: np.mean, np.median) of ``values`` with a
    bootstrap CI (BCa; percentile when BCa is undefined, e.g. for infinite values). A constant sample
    or one value: the interval is that value."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan)
    value = float(statistic(x))
    if x.size == 1 or np.all(x == x[0]):
        return Interval(value, value, value)
    for method in ("BCa", "percentile"):
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BCa's "degenerate" warning: the percentile fallback follows
            try:
                res = stats.bootstrap((x,), lambda a, axis=-1: statistic(a, axis=axis), confidence_level=level,
                                      n_resamples=n_resamples, method=method, rng=np.random.default_rng(seed),
                                      vectorized=True)
            except (ValueError, FloatingPointError):
                continue
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isnan(low) or math.isnan(high)):
            return Interval(value, low, high)
    return Interval(value, math.nan, math.nan)


@dataclass
class Comparison:
    """Method vs baseline on one metric: one-sided p (H1: the method is better), A = P(method run
    better than baseline run) + ½ P(tie), and the Holm-adjusted p (filled by :func:`holm`)."""

    p_value: float
    effect_a: float
    p_holm: float = math.nan


def compare(method: Sequence[float], baseline: Sequence[float], higher_is_better: bool = True) -> Comparison:
    """One-sided Mann–Whitney U (scipy: exact when there are no ties and the samples are small,
    else the normal approximation with tie correction) and Vargha–Delaney A from the same U."""
    x, y = np.asarray(method, dtype=float), np.asarray(baseline, dtype=float)
    if x.size == 0 or y.size == 0:
        return Comparison(math.nan, math.nan)
    alternative = "greater" if higher_is_better else "less"
    if np.all(np.concatenate([x, y]) == x[0]):  # all equal: no evidence either way
        return Comparison(1.0, 0.5)
    res = stats.mannwhitneyu(x, y, alternative=alternative, method="auto")
    a_greater = float(res.statistic) / (x.size * y.size)  # U of x = #(x > y) + ½ #(x = y)
    return Comparison(float(res.pvalue), a_greater if higher_is_better else 1.0 - a_greater)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN entries stay NaN and do not count in the family):
    sorted ascending, p_(i) · (m − i + 1), made monotone, capped at 1."""
    idx = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: p_values[i])
    m = len(order)
    out = [math.nan] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


def area_under_curve(steps: Sequence[float], values: Sequence[float]) -> float:
    """Normalised trapezoid area under a learning curve: the mean value over the span of the curve
    (one point: that value)."""
    if len(steps) == 0:
        return math.nan
    if len(steps) == 1:
        return float(values[0])
    area = sum((s1 - s0) * (v0 + v1) / 2 for s0, s1, v0, v1 in zip(steps, steps[1:], values, values[1:]))
    return float(area / (steps[-1] - steps[0]))


def first_reaching(steps: Sequence[float], values: Sequence[float], threshold: float) -> float:
    """The first step whose value is ≥ ``threshold``; inf if the curve never gets there."""
    for s, v in zip(steps, values):
        if v >= threshold:
            return float(s)
    return math.inf
