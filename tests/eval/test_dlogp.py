"""Δlog p analysis pieces: per-token scoring against a one-sequence brute force, most moved tokens,
quantile thresholds and correlations on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from delta_megatron.eval.dlogp import (
    TokenTable,
    correlation,
    most_moved_tokens,
    score_responses,
    thresholds_for_rates,
)
from tests.rollout.tiny import tiny_model


def test_score_responses_matches_per_sequence_brute_force():
    torch.set_num_threads(1)
    base, rl = tiny_model(0), tiny_model(1)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [20]]
    responses = [[3, 4, 1], [8], [30, 31, 32, 33, 1]]
    table = score_responses(base, rl, prompts, responses, pad_token_id=0, batch_size=2)
    assert table.seq.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2]
    assert table.position.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4]
    want = {k: [] for k in ("lb", "lr", "hb", "hr", "kl")}
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            lb = torch.log_softmax(base(torch.tensor([p + r])).logits[0].double(), -1)[len(p) - 1:-1]
            lr = torch.log_softmax(rl(torch.tensor([p + r])).logits[0].double(), -1)[len(p) - 1:-1]
            for t, tok in enumerate(r):
                want["lb"].append(float(lb[t, tok]))
                want["lr"].append(float(lr[t, tok]))
                want["hb"].append(float(-(lb[t].exp() * lb[t]).sum()))
                want["hr"].append(float(-(lr[t].exp() * lr[t]).sum()))
                want["kl"].append(float((lr[t].exp() * (lr[t] - lb[t])).sum()))
    tol = dict(abs=2e-5)
    assert table.logp_base.tolist() == pytest.approx(want["lb"], **tol)
    assert table.logp_rl.tolist() == pytest.approx(want["lr"], **tol)
    assert table.delta.tolist() == pytest.approx([a - b for a, b in zip(want["lr"], want["lb"])], **tol)
    assert table.entropy_base.tolist() == pytest.approx(want["hb"], **tol)
    assert table.entropy_rl.tolist() == pytest.approx(want["hr"], **tol)
    assert table.kl.tolist() == pytest.approx(want["kl"], **tol)
    with pytest.raises(ValueError, match="3 prompts for 2 responses"):
        score_responses(base, rl, prompts, responses[:2])


def _table(token_ids, deltas):
    n = len(token_ids)
    zeros = torch.zeros(n)
    return TokenTable(seq=torch.zeros(n, dtype=torch.long), position=torch.arange(n),
                      token_ids=torch.tensor(token_ids), logp_base=zeros, logp_rl=torch.tensor(deltas),
                      entropy_base=zeros, entropy_rl=zeros, kl=zeros)


def test_most_moved_tokens_by_mean_delta_with_min_count():
    # token 1: mean +1.0 (3x); token 2: mean −2.0 (3x); token 3: +5 but seen twice (left out); 4: −0.5 (3x)
    table = _table([1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4], [0.5, 1.0, 1.5, -1, -2, -3, 5, 5, -0.5, -0.5, -0.5])
    up, down = most_moved_tokens(table, decode=lambda t: f"t{t}", min_count=3)
    assert [(m.text, m.count, m.mean_delta) for m in up] == [("t1", 3, 1.0)]
    assert [(m.text, m.count, m.mean_delta) for m in down] == [("t2", 3, -2.0), ("t4", 3, -0.5)]
    up, _ = most_moved_tokens(table, decode=str, min_count=2)
    assert [m.text for m in up] == ["3", "1"]


def test_thresholds_select_the_asked_share():
    values = torch.arange(100, dtype=torch.float64)  # 0..99
    low = thresholds_for_rates(values, [0.1, 0.5], "low")
    high = thresholds_for_rates(values, [0.1], "high")
    assert low == pytest.approx([9.9, 49.5]) and high == pytest.approx([89.1])
    assert int((values <= low[0]).sum()) == 10 and int((values >= high[0]).sum()) == 10
    with pytest.raises(ValueError, match="no tokens"):
        thresholds_for_rates(torch.zeros(0), [0.1], "low")


def test_correlation_hand_computed():
    c = correlation(torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 3, 2, 4]))
    assert c["pearson"] == pytest.approx(0.8) and c["spearman"] == pytest.approx(0.8) and c["n"] == 4
    # ties get average ranks: x ranks [0.5, 0.5, 2] vs [0, 1, 2] -> 1.5 / sqrt(1.5 * 2)
    c = correlation(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert c["spearman"] == pytest.approx(1.5 / math.sqrt(3.0))
    assert math.isnan(correlation(torch.ones(3), torch.arange(3.0))["pearson"])

