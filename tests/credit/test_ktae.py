"""KTAE (baselines.md §8): the toy per-id tables, final advantages, Fisher modes, brute-force checks."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from delta_megatron.credit.ktae import (
    KTAEConfig,
    KTAECredit,
    fisher_exact_pvalue,
    fisher_score,
    key_token_table,
)
from delta_megatron.utils.configs import ConfigError, validate
from tests.credit.toy_batch import toy_batch

TOL = 1e-5


def close(got: float, want: float) -> bool:
    """1e-5 absolute, or relative for the large saturated x/s values the spec prints to 0.1."""
    return abs(got - want) <= max(TOL, 1e-5 * abs(want))


# §8 worked example [X]. id: (abcd, p, F, IG, h, x, s, kv)
G1 = {
    2: ([2, 2, 0, 0], 1.0, 0.0, 0.0, 0.0, -0.769923, 0.0, 0.0),
    11: ([2, 1, 0, 1], 1.0, 0.0, 0.311278, 0.785398, 1.265793, 0.197007, 0.098186),
    12: ([1, 0, 1, 2], 1.0, 0.0, 0.311278, 0.785398, 16536.2, 2573.7, 1.0),
    13: ([2, 0, 0, 2], 1 / 3, 0.513417, 1.0, 1.570796, 44682.4, 33811.6, 1.0),
    14: ([0, 2, 2, 0], 1 / 3, 0.513417, 1.0, -1.570796, -45653.7, -34546.6, -1.0),
    15: ([0, 1, 2, 1], 1.0, 0.0, 0.311278, -0.785398, -24706.7, -3845.3, -1.0),
}
G2_21 = ([1, 2, 0, 1], 0.122556, 0.615480, 2.393690, 0.146681, 0.073209)
FINAL = [
    [0.964210, 1.866024, 1.866024, 0.866024], [-0.767838, -1.866024, -0.866024],
    [0.964210, 1.866024, 1.866024, 0.866024], [-1.866024, -1.866024, -0.866024],
    [1.573206, 2.499997, 1.499997], [-0.426790, -1.499999, -0.499999], [-1.499999, -0.499999],
    [-0.426790, -1.499999, -1.499999, -0.499999],
]


def toy_table(mode: str = "canonical", **kw):
    tb = toy_batch()
    cfg = KTAEConfig(fisher_mode=mode, **kw)
    tab, _ = KTAECredit(cfg).table(tb.credit_inputs())
    return tab


@pytest.mark.parametrize("mode", ["canonical", "reference"])
def test_g1_table(mode):
    g1 = toy_table(mode).for_group(0)
    assert sorted(g1) == sorted(G1)
    for tid, (abcd, p, f, ig, h, x, s, kv) in G1.items():
        row = g1[tid]
        assert row["abcd"] == abcd, tid
        got = [row["p"], row["F"], row["IG"], row["h"], row["x"], row["s"], row["kv"]]
        for name, g, w in zip(["p", "F", "IG", "h", "x", "s", "kv"], got, [p, f, ig, h, x, s, kv]):
            assert close(g, w), (tid, name, g, w)
        assert row["T"] == [8.0, 6.0]
        assert row["K"][0] == pytest.approx(2.142857, abs=TOL)
        assert row["K"][1] == pytest.approx(1.857143, abs=TOL)


@pytest.mark.parametrize("mode", ["canonical", "reference"])
def test_g2_table(mode):
    g2 = toy_table(mode).for_group(1)
    assert sorted(g2) == [2, 21, 22, 23, 24]
    abcd, ig, h, x, s, kv = G2_21
    row = g2[21]
    assert row["abcd"] == abcd and row["F"] == 0.0
    for g, w in zip([row["IG"], row["h"], row["x"], row["s"], row["kv"]], [ig, h, x, s, kv]):
        assert close(g, w), (g, w)
    assert row["T"] == [3.0, 9.0] and row["K"] == pytest.approx([1.5, 2.5], abs=TOL)
    assert g2[22]["p"] == pytest.approx(0.25, abs=TOL)
    assert g2[22]["F"] == pytest.approx(0.606531, abs=TOL)
    assert g2[22]["IG"] == pytest.approx(0.811278, abs=TOL)
    assert g2[22]["kv"] == pytest.approx(1.0, abs=TOL)
    assert g2[23]["kv"] == pytest.approx(-1.0, abs=TOL)
    assert g2[24]["kv"] == pytest.approx(-1.0, abs=TOL)
    assert g2[2]["kv"] == 0.0


@pytest.mark.parametrize("mode", ["canonical", "reference"])
def test_final_advantages(mode):
    tb = toy_batch()
    out = KTAECredit(KTAEConfig(fisher_mode=mode)).assign(tb.credit_inputs())
    assert out.target == "advantage_add" and out.values.dtype == torch.float32
    final = tb.split(tb.advantages + out.values.double())
    for got, want in zip(final, FINAL):
        assert got == pytest.approx(want, abs=TOL)


def test_float32_fisher_quirks():
    def p_and_f(row, mode):
        p = fisher_exact_pvalue(torch.tensor([row], dtype=torch.float64), mode)
        return float(p), float(fisher_score(p, mode))

    p, f = p_and_f([4, 4, 4, 4], "reference")
    assert p == pytest.approx(0.99999988, abs=1e-8) and p != 1.0
    assert f == pytest.approx(0.135335, abs=1e-6)
    p, f = p_and_f([4, 4, 4, 4], "canonical")
    assert p == pytest.approx(1.0, abs=1e-12) and f == 0.0
    # symmetric-tail ties dropped in float32
    assert p_and_f([2, 6, 0, 8], "reference")[0] == pytest.approx(0.2333, abs=1e-4)
    assert p_and_f([2, 6, 0, 8], "canonical")[0] == pytest.approx(7 / 15, abs=1e-12)
    assert p_and_f([0, 5, 2, 9], "reference")[0] == pytest.approx(0.5417, abs=1e-4)
    assert p_and_f([0, 5, 2, 9], "canonical")[0] == pytest.approx(1.0, abs=1e-12)


def all_tables(n: int) -> list[tuple[int, int, int, int]]:
    return [(a, b, c, n - a - b - c) for a in range(n + 1) for b in range(n + 1 - a) for c in range(n + 1 - a - b)]


def test_canonical_matches_scipy_all_n16_tables():
    stats = pytest.importorskip("scipy.stats")
    rows = all_tables(16)
    got = fisher_exact_pvalue(torch.tensor(rows, dtype=torch.float64), "canonical")
    want = torch.tensor([stats.fisher_exact([[a, b], [c, d]])[1] for a, b, c, d in rows], dtype=torch.float64)
    assert len(rows) == 969
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_reference_mode_reproduces_spec_counts_n16():
    """§8: of the 920 tables with both sides non-empty and the id present, 268 have exact p = 1 and
    the float32 reference returns p != 1 for 246 of them."""
    rows = [r for r in all_tables(16) if r[0] + r[2] > 0 and r[1] + r[3] > 0 and r[0] + r[1] > 0]
    t = torch.tensor(rows, dtype=torch.float64)
    canon = fisher_exact_pvalue(t, "canonical")
    ref = fisher_exact_pvalue(t, "reference")
    exact_one = canon >= 1 - 1e-6
    assert len(rows) == 920 and int(exact_one.sum()) == 268
    assert int((exact_one & (ref != 1.0)).sum()) == 246
    # canonical F is exactly 0 on all of them; reference F is not on those 246
    assert bool((fisher_score(canon, "canonical")[exact_one] == 0).all())
    assert int((fisher_score(ref, "reference")[exact_one] > 0).sum()) == 246


# ---- brute-force reference: plain Python dict loops and exact rational Fisher ----------------


def exact_fisher(a: int, b: int, c: int, d: int) -> float:
    n, r1, c1 = a + b + c + d, a + b, a + c

    def prob(k):
        return Fraction(math.comb(c1, k) * math.comb(n - c1, r1 - k), math.comb(n, r1))

    p_obs = prob(a)
    return float(sum(prob(k) for k in range(max(0, r1 + c1 - n), min(r1, c1) + 1) if prob(k) <= p_obs))


def brute_kv(seqs, scores, groups, alpha, beta, use_tf, top, ignore) -> dict[int, dict[int, float]]:
    """kv per group label, following §8 steps 1–7 literally (exact Fisher, F = 0 iff p == 1)."""
    out = {}
    for g in sorted(set(groups)):
        members = [i for i, gg in enumerate(groups) if gg == g]
        corr = [i for i in members if scores[i] > 0]
        wrong = [i for i in members if scores[i] <= 0]
        ids = sorted({t for i in members for t in seqs[i]})
        if not corr or not wrong:
            out[g] = {t: 0.0 for t in ids}
            continue
        t_c = sum(len(seqs[i]) for i in corr)
        t_w = sum(len(seqs[i]) for i in wrong)
        avg = (t_c + t_w) / 2
        k_c, k_w = 2.0 * (0.5 + 0.5 * t_c / avg), 2.0 * (0.5 + 0.5 * t_w / avg)
        kvs = {}
        for t in ids:
            a = sum(t in seqs[i] for i in corr)
            b = sum(t in seqs[i] for i in wrong)
            c, d, n = len(corr) - a, len(wrong) - b, len(members)
            p = exact_fisher(a, b, c, d)
            f = math.exp(-2 * p) if p != 1.0 else 0.0

            def hh(x):
                return -x * math.log2(x) if x > 0 else 0.0

            ig = hh((a + c) / n) + hh((b + d) / n)
            if a + b:
                ig -= (a + b) / n * (hh(a / (a + b)) + hh(b / (a + b)))
            if c + d:
                ig -= (c + d) / n * (hh(c / (c + d)) + hh(d / (c + d)))
            x = math.asin(math.sqrt(a / (a + c))) - math.asin(math.sqrt(b / (b + d)))
            if use_tf:
                fc = sum(s.count(t) for s in (seqs[i] for i in corr)) / t_c
                fw = sum(s.count(t) for s in (seqs[i] for i in wrong)) / t_w
                tfc, tfw = fc * 3 / (fc + k_c), fw * 3 / (fw + k_w)
                x += tfc / (tfw + 1e-5) - tfw / (tfc + 1e-5)
            s = (alpha * f + beta * ig) * x / (alpha + beta)
            kvs[t] = 0.0 if t in ignore else top * math.tanh(s / 2)
        out[g] = kvs
    return out


@pytest.mark.parametrize("seed,beta,use_tf,top", [(0, 1.0, True, 1.0), (1, 2.0, False, 0.5), (2, 1.0, False, 2.0)])
def test_vectorised_matches_brute_force(seed, beta, use_tf, top):
    rng = random.Random(seed)
    group_sizes = {40: 8, 7: 16, 1_000_003: 4, 12: 6}  # arbitrary, non-contiguous group labels
    seqs, groups, scores = [], [], []
    for g, size in group_sizes.items():
        for _ in range(size):
            length = rng.randint(1, 12)
            seqs.append([rng.choice([3, 4, 5, 6, 7, 8, 151643]) for _ in range(length)])
            groups.append(g)
            scores.append(rng.choice([1.0, -1.0, 0.0, 0.5]))
    for i in [i for i, g in enumerate(groups) if g == 12]:  # group 12: everyone correct -> kv 0
        scores[i] = 1.0
    # pad each response with invalid tokens that must not count
    tok, seq_idx, mask = [], [], []
    for i, s in enumerate(seqs):
        tok += s + [9, 9]
        seq_idx += [i] * (len(s) + 2)
        mask += [True] * len(s) + [False, False]
    cfg = KTAEConfig(beta=beta, use_tf=use_tf, top=top, fisher_mode="canonical", p_one_tol=1e-12, tie_rtol=1e-9)
    tab, token_pair = key_token_table(torch.tensor(tok), torch.tensor(seq_idx), torch.tensor(mask),
                                      torch.tensor(scores), torch.tensor(groups), cfg)
    want = brute_kv(seqs, scores, groups, 1.0, beta, use_tf, top, {151643})
    assert sorted(want) == [7, 12, 40, 1_000_003]
    for g, kvs in want.items():
        got = tab.for_group(g)
        assert sorted(got) == sorted(kvs), g
        for t, kv in kvs.items():
            assert got[t]["kv"] == pytest.approx(kv, abs=1e-9, rel=1e-9), (g, t)
    assert bool((token_pair[~torch.tensor(mask)] == -1).all())
    assert tab.for_group(12) and all(v["kv"] == 0.0 for v in tab.for_group(12).values())


def test_beta2_option_and_ignore_ids():
    g1 = toy_table(beta=2.0).for_group(0)
    # id 11: F = 0 so s = β·IG·x/(α+β) = 2/3 · 0.311278 · 1.265793
    s = 2 / 3 * 0.311278 * 1.265793
    assert g1[11]["s"] == pytest.approx(s, abs=TOL)
    assert g1[11]["kv"] == pytest.approx(math.tanh(s / 2), abs=TOL)
    # ignoring id 11 zeroes its kv only
    g1 = toy_table(ignore_ids=[11]).for_group(0)
    assert g1[11]["kv"] == 0.0 and g1[11]["s"] == pytest.approx(0.197007, abs=TOL)
    assert g1[13]["kv"] == pytest.approx(1.0, abs=TOL)


def test_tf_off_uses_direction_only():
    g1 = toy_table(use_tf=False).for_group(0)
    assert g1[13]["x"] == pytest.approx(math.pi / 2, abs=TOL)
    # s = (F + IG)·h / 2 = (0.513417 + 1)·π/2 / 2
    assert g1[13]["s"] == pytest.approx((0.513417 + 1.0) * math.pi / 4, abs=TOL)
    assert g1[2]["x"] == 0.0


def test_config_validation():
    with pytest.raises(ConfigError, match="top"):
        validate(KTAEConfig(top=0.0))
    with pytest.raises(ConfigError, match="beta"):
        validate(KTAEConfig(alpha=0.0, beta=0.0))
    with pytest.raises(ConfigError, match="ignore_ids"):
        validate(KTAEConfig(ignore_ids=[-1]))
    validate(KTAEConfig(fisher_mode="reference", beta=2.0))
