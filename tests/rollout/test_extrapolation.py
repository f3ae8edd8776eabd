"""Selective test-time extrapolation (baselines.md §9.3): the 3-token toy for both γ."""

from __future__ import annotations

import math

import pytest
import torch

from delta_megatron.rollout.extrapolation import (
    ExtrapolationConfig,
    align_logprobs,
    extrapolated_probs,
    selective_extrapolation,
    top_p_filter,
)
from delta_megatron.utils.configs import ConfigError, validate

TOL = 1e-6
BASE = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()
RL = torch.tensor([0.2, 0.6, 0.2], dtype=torch.float64).log()
IDS = torch.arange(3)


@pytest.mark.parametrize("gamma,extra,final", [
    (0.05, [0.188741, 0.613670, 0.197589], {2: 0.243558, 1: 0.756442}),
    (0.1, [0.177942, 0.627041, 0.195017], {2: 0.237230, 1: 0.762770}),
])
def test_toy(gamma, extra, final):
    cfg = ExtrapolationConfig(tau=-0.3, gamma=gamma, temperature=1.0, top_p=0.7)
    step = selective_extrapolation(IDS, BASE, IDS, RL, sampled_id=0, cfg=cfg)
    assert step.resample
    assert step.delta == pytest.approx(-0.916291, abs=TOL)
    assert step.extrapolated.tolist() == pytest.approx(extra, abs=TOL)
    want = [0.0, final[1], final[2]]  # token 0 dropped by top-p (cumulative 0.18 <= 0.3)
    assert step.probs.tolist() == pytest.approx(want, abs=TOL)


def test_toy_logits_and_deltas():
    delta = RL - BASE
    assert delta.tolist() == pytest.approx([-0.916291, 0.693147, 0.0], abs=TOL)
    logits = -0.05 * BASE + 1.05 * RL
    assert logits.tolist() == pytest.approx([-1.655252, -0.476168, -1.609438], abs=TOL)
    assert extrapolated_probs(BASE, RL, 0.05).tolist() == pytest.approx(torch.softmax(logits, 0).tolist(), abs=1e-12)


def test_keep_when_delta_above_tau():
    step = selective_extrapolation(IDS, BASE, IDS, RL, sampled_id=1, cfg=ExtrapolationConfig(tau=-0.3))
    assert not step.resample and step.delta == pytest.approx(math.log(2.0), abs=TOL)
    assert step.probs.tolist() == [0.0, 1.0, 0.0]
    # γ = 0 is "selective replace": resample from π_RL itself (top-p 1 keeps everything)
    step = selective_extrapolation(IDS, BASE, IDS, RL, 0, ExtrapolationConfig(gamma=0.0, top_p=1.0))
    assert step.probs.tolist() == pytest.approx([0.2, 0.6, 0.2], abs=1e-12)


def test_missing_rl_ids_get_smallest_rl_logprob():
    base_ids = torch.tensor([7, 3, 9])
    rl_ids = torch.tensor([3, 5])
    rl_logp = torch.tensor([-0.1, -2.5], dtype=torch.float64)
    assert align_logprobs(base_ids, rl_ids, rl_logp).tolist() == [-2.5, -0.1, -2.5]
    step = selective_extrapolation(base_ids, torch.tensor([-0.5, -1.5, -2.0], dtype=torch.float64),
                                   rl_ids, rl_logp, sampled_id=7, cfg=ExtrapolationConfig(tau=-0.3))
    assert step.delta == pytest.approx(-2.0, abs=1e-12) and step.resample


def test_top_p_keeps_top_token():
    p = torch.tensor([0.05, 0.9, 0.05], dtype=torch.float64)
    assert top_p_filter(p, 0.01).tolist() == [0.0, 1.0, 0.0]
    assert top_p_filter(p, 1.0).tolist() == pytest.approx(p.tolist(), abs=1e-12)


def test_top_p_ties_drop_the_base_models_least_likely_first():
    p = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)  # the cut (mass <= 0.3) splits the tie
    assert top_p_filter(p, 0.7, tiebreak=torch.tensor([-1.0, -2.0, -0.1])).tolist() == pytest.approx(
        [0.25, 0.0, 0.75], abs=1e-12)
    assert top_p_filter(p, 0.7, tiebreak=torch.tensor([-2.0, -1.0, -0.1])).tolist() == pytest.approx(
        [0.0, 0.25, 0.75], abs=1e-12)
    batched = top_p_filter(p.repeat(2, 1), 0.7, tiebreak=torch.tensor([[-1.0, -2.0, 0.0], [-2.0, -1.0, 0.0]]))
    torch.testing.assert_close(batched, torch.tensor([[0.25, 0.0, 0.75], [0.0, 0.25, 0.75]], dtype=torch.float64))


def test_config_validation():
    with pytest.raises(ConfigError, match="top_p"):
        validate(ExtrapolationConfig(top_p=0.0))
    with pytest.raises(ConfigError, match="temperature"):
        validate(ExtrapolationConfig(temperature=0.0))
