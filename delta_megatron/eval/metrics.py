"""avg@k and unbiased pass@k, per question, per benchmark, and question-count-weighted across benchmarks.

pass@k uses the unbiased estimator of Chen et al. (2021): with ``n`` samples of which ``c`` are correct,
``pass@k = 1 - C(n-c, k) / C(n, k)``, computed with exact integers so small cases are exact. avg@k is
the mean accuracy over the ``k`` samples (the DelTA paper's headline "mean over all samples"). Averages
over benchmarks weight each benchmark by its number of questions, as the paper's "Avg." does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from math import comb

__all__ = ["pass_at_k", "avg_at_k", "mean_pass_at_k", "weighted_average"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one question: probability that at least one of ``k`` samples drawn without
    replacement from the ``n`` generated ones is correct."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1 - Fraction(comb(n - c, k), comb(n, k)))


def avg_at_k(correct: Sequence[bool | int | float]) -> float:
    """Mean accuracy over one question's samples."""
    if not correct:
        raise ValueError("avg@k of zero samples")
    return sum(float(x) for x in correct) / len(correct)


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean over questions of pass@k, ``counts`` = ``[(n, c), ...]`` per question."""
    if not counts:
        raise ValueError("no questions")
    return sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)


def weighted_average(values: Mapping[str, float], weights: Mapping[str, int]) -> float:
    """``sum(w_b * v_b) / sum(w_b)`` over benchmarks ``b`` (weights: question counts)."""
    missing = set(values) - set(weights)
    if missing:
        raise ValueError(f"no weight for {sorted(missing)}")
    total = sum(weights[b] for b in values)
    if total <= 0:
        raise ValueError("weights sum to zero")
    return sum(weights[b] * v for b, v in values.items()) / total
