"""The study's statistics on inputs with known answers (exact Mann–Whitney tails counted by hand,
Vargha–Delaney A from pair counts, Holm's step-down by hand, bootstrap CIs of known width)."""

import math

import numpy as np
import pytest

from delta_megatron.study.stats import area_under_curve, bootstrap_ci, compare, first_reaching, holm


def test_mann_whitney_exact_tails():
    # 3 vs 3 fully separated: one of C(6,3) = 20 equally likely rank splits is this extreme
    better = compare([4, 5, 6], [1, 2, 3])
    assert better.p_value == pytest.approx(1 / 20) and better.effect_a == 1.0
    worse = compare([1, 2, 3], [4, 5, 6])
    assert worse.p_value == pytest.approx(1.0) and worse.effect_a == 0.0
    # 8 vs 8 separated: 1 / C(16, 8)
    assert compare(range(10, 18), range(8)).p_value == pytest.approx(1 / 12870)
    # U = 5 of 6 pairs (3 vs 2): P(U >= 5) = 2 / C(5, 2)
    c = compare([3, 5, 7], [1, 4])
    assert c.p_value == pytest.approx(0.2) and c.effect_a == pytest.approx(5 / 6)


def test_lower_is_better_flips_the_direction():
    c = compare([1, 2, 3], [4, 5, 6], higher_is_better=False)
    assert c.p_value == pytest.approx(1 / 20) and c.effect_a == 1.0
    # never reaching (inf) is worst; inf vs inf is a tie: (3 + 3 + 3 · ½) / 9
    steps = compare([10, 20, math.inf], [math.inf] * 3, higher_is_better=False)
    assert steps.effect_a == pytest.approx(7.5 / 9) and steps.p_value < 0.5


def test_vargha_delaney_counts_ties_half():
    assert compare([1, 2, 2, 3], [2, 2, 2, 2]).effect_a == pytest.approx(0.5)
    assert compare([2, 3], [2, 1]).effect_a == pytest.approx((0.5 + 1 + 1 + 1) / 4)
    same = compare([0.5] * 4, [0.5] * 4)
    assert (same.p_value, same.effect_a) == (1.0, 0.5)


def test_holm_by_hand():
    # sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → monotone 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = holm([0.01, math.nan, 0.04])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
    assert holm([0.6, 0.9]) == [1.0, 1.0]  # capped
    assert holm([]) == []


def test_bootstrap_ci():
    x = np.random.default_rng(1).normal(3.0, 2.0, 400)
    iv = bootstrap_ci(x)
    assert iv.value == pytest.approx(x.mean())
    assert iv.low < 3.0 < iv.high
    expected = 2 * 1.96 * x.std(ddof=1) / math.sqrt(len(x))  # the normal-theory width
    assert iv.high - iv.low == pytest.approx(expected, rel=0.15)
    const = bootstrap_ci([0.25] * 8)
    assert (const.value, const.low, const.high) == (0.25, 0.25, 0.25)
    one = bootstrap_ci([0.7])
    assert (one.value, one.low, one.high) == (0.7, 0.7, 0.7)
    assert math.isnan(bootstrap_ci([]).value)
    again = bootstrap_ci(x)
    assert (again.low, again.high) == (iv.low, iv.high)  # seeded: the report is reproducible
    censored = bootstrap_ci([10, 20, 30, math.inf, math.inf], np.median)
    assert censored.value == 30 and censored.low >= 10


def test_curve_summaries():
    steps, acc = [10, 20, 30, 40], [0.2, 0.4, 0.4, 0.6]
    assert area_under_curve(steps, acc) == pytest.approx((0.3 + 0.4 + 0.5) * 10 / 30)
    assert area_under_curve([10], [0.3]) == 0.3
    assert first_reaching(steps, acc, 0.4) == 20
    assert first_reaching(steps, acc, 0.61) == math.inf
