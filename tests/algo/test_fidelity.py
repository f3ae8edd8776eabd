"""Reference fidelity (docs/methods/fidelity.md): the FIPO normaliser with a dropped response, the GSPO
clamp edge, the Forking metrics over all response tokens and the train/inference mismatch corrections
— hand-computed toy numbers, whole batch and micro-batch splits (the CP / DP layouts of the same
examples run in tests/dist/cp_worker.py)."""

from __future__ import annotations

import math

import pytest
import torch

from delta_megatron.algo import AlgoConfig, LossNormalizer, PolicyLossInputs, policy_loss
from delta_megatron.algo.aggregation import kept_scale, normalizer_share
from delta_megatron.algo.rollout_correction import MismatchConfig, mismatch_metrics
from delta_megatron.credit.forking import top_entropy_mask
from delta_megatron.utils.configs import ConfigError, apply_overrides, validate
from tests.algo.fidelity_toy import (
    CAPPED_FRAC,
    CORRECTION_LOSS,
    FIPO_DROP_GRAD_SUM,
    FIPO_DROP_KEPT_TOKENS,
    FIPO_DROP_LOSS,
    LOG_RATIO,
    LOG_RATIO_DROP,
    LOG_RHO,
    MASKED_FRAC,
    MISMATCH,
    SEQ,
    TOL,
    correction_config,
    correction_grad,
    fipo_drop_config,
    g1_share,
)
from tests.credit.toy_batch import toy_batch

SPLITS = ([list(range(14))], [[0, 1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13]],
          [[11, 12, 13], [0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10]], [[t] for t in range(14)])


def split_total(cfg, parts, log_ratio, log_rho=None):
    """Loss and gradient of the g1 mini-batch cut into ``parts`` (token lists; a response may be cut
    too when the loss allows it): Σ shares, rescaled by kept_scale(Σ norm_dropped)."""
    loss, grad, dropped = 0.0, torch.zeros(14, dtype=torch.float64), 0.0
    for part in parts:
        share, g, metrics = g1_share(cfg, torch.tensor(part), log_ratio, log_rho)
        loss, grad, dropped = loss + float(share), grad + g, dropped + metrics["norm_dropped"]
    scale = kept_scale(dropped)
    return loss * scale, grad * scale, dropped


def whole_responses(parts):
    """Token parts of whole responses only (FIPO's filter and the sequence mask see whole
    responses in a DP shard / micro-batch; under CP the group reduction makes them whole)."""
    return [sorted(t for t in range(14) if int(SEQ[t]) in p) for p in parts]


# ---------------------------------------------------------------- §1 FIPO normaliser
@pytest.mark.parametrize("normalizer", ["kept", "all"])
def test_fipo_dropped_response_toy(normalizer):
    cfg = fipo_drop_config(normalizer)
    denom = FIPO_DROP_KEPT_TOKENS if normalizer == "kept" else 14
    want_grad = torch.tensor(FIPO_DROP_GRAD_SUM, dtype=torch.float64) / denom
    for parts in ([[0, 1, 2, 3]], [[0, 2], [1, 3]], [[3], [1], [0], [2]]):
        loss, grad, dropped = split_total(cfg, whole_responses(parts), LOG_RATIO_DROP)
        assert loss == pytest.approx(FIPO_DROP_LOSS[normalizer], abs=TOL), parts
        torch.testing.assert_close(grad, want_grad, atol=TOL, rtol=0)
        assert dropped == pytest.approx(3 / 14 if normalizer == "kept" else 0.0, abs=1e-12)


def test_fipo_kept_equals_all_with_the_true_kept_count():
    """The deferred rescale is the same as knowing the kept count in advance."""
    tb = toy_batch()
    logp = (tb.logp_old[:14] + LOG_RATIO_DROP).float().requires_grad_(True)
    kept = torch.tensor([True] * 4 + [False] * 3 + [True] * 7)
    inp = PolicyLossInputs(logp=logp, logp_old=tb.logp_old[:14].float(), advantages=tb.advantages[:14].float(),
                           mask=torch.ones(14, dtype=torch.bool), seq_index=SEQ, seq_lengths=torch.tensor([4, 3, 4, 3]),
                           num_seqs=4, normalizer=LossNormalizer(float(kept.sum()), 3.0))
    loss, _ = policy_loss(fipo_drop_config("all"), inp)
    assert loss.item() == pytest.approx(FIPO_DROP_LOSS["kept"], abs=TOL)


def test_fipo_token_losses_and_metrics():
    _, _, metrics = g1_share(fipo_drop_config("kept"), torch.arange(14), LOG_RATIO_DROP)
    assert metrics["norm_dropped"] == pytest.approx(3 / 14, abs=1e-12)
    assert metrics["dual_clip_frac"] == pytest.approx(2 / 14, abs=1e-6)  # y2[0], y2[1]
    assert metrics["pg_loss"] * kept_scale(3 / 14) == pytest.approx(FIPO_DROP_LOSS["kept"], abs=TOL)


@pytest.mark.parametrize("agg,share", [("token-mean", 3 / 14), ("seq-mean-token-mean", 1 / 4),
                                       ("seq-mean-token-sum", 1 / 4), ("seq-mean-token-sum-norm", 0.0)])
def test_normalizer_share_per_aggregation(agg, share):
    """A dropped whole response is 3 of 14 tokens, or 1 of 4 responses however its tokens are cut."""
    norm = LossNormalizer(14.0, 4.0, loss_const=8.0)
    lengths = torch.tensor([4, 3, 4, 3])
    dropped = SEQ == 1
    whole = float(normalizer_share(agg, dropped, SEQ, lengths, norm))
    cut = sum(float(normalizer_share(agg, dropped[p], SEQ[p], lengths, norm))
              for p in (torch.tensor([0, 4, 5]), torch.tensor([6, 7, 13])))
    assert whole == pytest.approx(share, abs=1e-15) and cut == pytest.approx(share, abs=1e-15)
    assert kept_scale(0.0) == 1.0 and kept_scale(1.0) == 1.0 and kept_scale(0.25) == pytest.approx(4 / 3)


def test_fipo_kept_with_kl_is_a_config_error():
    with pytest.raises(ConfigError, match=r"loss\.fipo\.normalizer"):
        validate(apply_overrides(AlgoConfig(), ["loss.name=fipo", "kl.estimator=k3"]), "algo")
    validate(apply_overrides(AlgoConfig(), ["loss.name=fipo", "kl.estimator=k3", "loss.fipo.normalizer=all"]))
    with pytest.raises(ConfigError, match="normalizer"):
        apply_overrides(AlgoConfig(), ["loss.fipo.normalizer=some"])
    assert AlgoConfig().loss.fipo.normalizer == "kept"


# ---------------------------------------------------------------- §2 GSPO clamp
@pytest.mark.parametrize("adv", [-1.0, 1.0])
def test_gspo_gradient_is_zero_past_the_log_ratio_clamp(adv):
    """One response of 3 tokens, every token at log-ratio ℓ (so log s = ℓ). Past 10 the value is
    e^10 and the gradient exactly 0 (verl clamps the combined log-ratio); below it, for A < 0 (no
    dual clip, s above the clip band) the gradient is −A·s/3 per token."""
    cfg = apply_overrides(AlgoConfig(), ["loss.name=gspo"])
    logp_old = torch.log(torch.tensor([0.5, 0.25, 0.125], dtype=torch.float64))
    for ell, value, grad in ((10.5, math.exp(10.0), 0.0), (9.5, math.exp(9.5), math.exp(9.5) / 3)):
        logp = (logp_old + ell).requires_grad_(True)
        inp = PolicyLossInputs(logp=logp, logp_old=logp_old, advantages=torch.full((3,), adv, dtype=torch.float64),
                               mask=torch.ones(3, dtype=torch.bool), seq_index=torch.zeros(3, dtype=torch.long),
                               seq_lengths=torch.tensor([3]), num_seqs=1, normalizer=LossNormalizer(3.0, 1.0))
        loss, metrics = policy_loss(cfg, inp)
        loss.backward()
        if adv < 0:
            assert loss.item() == pytest.approx(value, rel=1e-6)
            assert logp.grad.tolist() == pytest.approx([grad] * 3, rel=1e-6, abs=0.0)
        else:  # A > 0: the clip band holds s at 1 + 4e-4, no gradient either way
            assert loss.item() == pytest.approx(-(1 + 4e-4), rel=1e-6)
            assert logp.grad.abs().max().item() == 0.0
        assert metrics["ratio_mean"].item() == pytest.approx(min(math.exp(ell), math.exp(10.0)), rel=1e-6)


# ---------------------------------------------------------------- §3 Forking metrics
def test_forking_metrics_average_over_all_response_tokens():
    """Whole toy batch as one micro-batch (g1 log-ratios, g2 on-policy): the top-6 entropy tokens carry
    the loss (normaliser 6); clip / dual-clip fractions and ppo_kl average over all 26 response
    tokens as in the reference, their ``_selected`` versions over the 6."""
    tb = toy_batch()
    logp = (tb.logp_old + tb.log_ratio).float().requires_grad_(True)
    everything = torch.ones(26, dtype=torch.bool)
    selected = top_entropy_mask(tb.entropy, everything, 0.2)[0]
    lengths = torch.tensor(tb.lengths)
    inp = PolicyLossInputs(logp=logp, logp_old=tb.logp_old.float(), advantages=tb.advantages.float(),
                           mask=selected, seq_index=tb.seq_index, seq_lengths=lengths, num_seqs=8,
                           normalizer=LossNormalizer(6.0, 8.0, num_response_tokens=26.0), response_mask=everything)
    loss, m = policy_loss(AlgoConfig(), inp)
    assert loss.item() == pytest.approx(1.154589, abs=TOL)
    assert m["clip_frac"].item() == pytest.approx(4 / 26, abs=1e-6)  # y1[1], y2[0], y3[2], y4[0]
    assert m["dual_clip_frac"].item() == pytest.approx(1 / 26, abs=1e-6)  # y2[1]
    assert m["ppo_kl"].item() == pytest.approx(-2.85 / 26, abs=1e-6)
    assert m["clip_frac_selected"].item() == 0.0
    assert m["dual_clip_frac_selected"].item() == pytest.approx(1 / 6, abs=1e-6)
    assert m["ppo_kl_selected"].item() == pytest.approx(-2.55 / 6, abs=1e-6)


# ---------------------------------------------------------------- §5 rollout correction
@pytest.mark.parametrize("mode", ["none", "tis", "icepop", "seq-mask-tis"])
def test_rollout_correction_toy_and_splits(mode):
    cfg = correction_config(mode)
    want = correction_grad(mode)
    token_splits = SPLITS if mode != "seq-mask-tis" else [whole_responses(p) for p in
                                                           ([[0, 1, 2, 3]], [[0, 2], [1, 3]], [[3], [1], [0], [2]])]
    for parts in token_splits:
        loss, grad, dropped = split_total(cfg, parts, LOG_RATIO, LOG_RHO)
        assert loss == pytest.approx(CORRECTION_LOSS[mode], abs=TOL), parts
        torch.testing.assert_close(grad, want, atol=TOL, rtol=0)
        assert dropped == pytest.approx(4 / 14 if mode == "seq-mask-tis" else 0.0, abs=1e-12)


@pytest.mark.parametrize("mode", ["none", "tis", "icepop", "seq-mask-tis"])
def test_mismatch_metrics_toy(mode):
    tb = toy_batch()
    logp_old = tb.logp_old[:14]
    got = mismatch_metrics(mode, MismatchConfig(), logp_old, logp_old - LOG_RHO, torch.ones(14, dtype=torch.bool),
                           SEQ, 4)
    for key, value in MISMATCH.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert got["mismatch/masked_frac"] == pytest.approx(MASKED_FRAC[mode], abs=1e-12)
    assert got.get("mismatch/capped_frac") == (pytest.approx(CAPPED_FRAC[mode], abs=1e-12)
                                               if mode in CAPPED_FRAC else None)


def test_rollout_correction_needs_engine_logprobs_and_valid_config():
    _, _, _ = g1_share(correction_config("none"), torch.arange(14), LOG_RATIO)  # none: not needed
    with pytest.raises(ValueError, match="logp_rollout"):
        g1_share(correction_config("tis"), torch.arange(14), LOG_RATIO)
    with pytest.raises(ConfigError, match="rollout_correction"):
        validate(apply_overrides(AlgoConfig(), ["rollout_correction=is"]), "algo")
    with pytest.raises(ConfigError, match=r"algo\.mismatch\.low"):
        validate(apply_overrides(AlgoConfig(), ["mismatch.low=2.0", "mismatch.high=1.5"]), "algo")
    with pytest.raises(ConfigError, match=r"algo\.mismatch\.tis_cap"):
        validate(apply_overrides(AlgoConfig(), ["mismatch.tis_cap=0"]), "algo")
    cfg = AlgoConfig()
    assert (cfg.rollout_correction, cfg.mismatch.tis_cap, cfg.mismatch.low, cfg.mismatch.high) == ("none", 2.0, 0.5, 2.0)
