"""The fidelity.md worked examples under DP and CP layouts (run by tests/dist/cp_worker.py on every rank).

* FIPO with a dropped response (``normalizer`` kept / all) and the rollout corrections (none, tis,
  icepop, seq-mask-tis): each rank's share of the g1 loss and gradient, summed over the group and
  rescaled by ``kept_scale`` of the summed dropped fraction — DP: whole responses per rank; CP: load-
  balanced chunks of every response with the sequence statistics reduced over the group;
* the batch mismatch metrics (k3-KL, masked / capped fractions, exact ratio percentiles) over the
  same token splits;
* the PPL low-prob variants with responses (and so prompt groups) spread over the ranks, both as
  sharded inputs and as the credit pipeline's view (all tokens, log-probs only on owned ones).

Returns the largest deviation from the hand-computed numbers per case (``{layout}/{case}``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from delta_megatron.algo.aggregation import kept_scale
from delta_megatron.algo.rollout_correction import MismatchConfig, mismatch_metrics
from delta_megatron.credit.lowprob import LowProbConfig, LowProbCredit
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
    correction_config,
    correction_grad,
    cp_chunks,
    dp_shard,
    fipo_drop_config,
    g1_share,
)
from tests.credit.test_lowprob import PPL
from tests.credit.toy_batch import toy_batch

MODES = ("none", "tis", "icepop", "seq-mask-tis")


def _summed(cfg, tokens, log_ratio, log_rho, cp_group, group) -> tuple[float, torch.Tensor]:
    share, grad, metrics = g1_share(cfg, tokens, log_ratio, log_rho, cp_group)
    buf = torch.cat([share.view(1), grad, torch.tensor([metrics["norm_dropped"]], dtype=torch.float64)])
    dist.all_reduce(buf, group=group)
    scale = kept_scale(float(buf[-1]))
    return float(buf[0]) * scale, buf[1:15] * scale


def _err(loss: float, grad: torch.Tensor, want_loss: float, want_grad: torch.Tensor) -> float:
    return max(abs(loss - want_loss), float((grad - want_grad).abs().max()))


def fidelity_errors(rank: int, world: int, group) -> dict[str, float]:
    errors: dict[str, float] = {}
    logp_old = toy_batch().logp_old[:14]
    for layout, tokens_of, cp in (("cp", cp_chunks, True), ("dp", dp_shard, False)):
        tokens = tokens_of(world, rank)
        cp_group = group if cp else None
        for normalizer in ("kept", "all"):
            denom = FIPO_DROP_KEPT_TOKENS if normalizer == "kept" else 14
            loss, grad = _summed(fipo_drop_config(normalizer), tokens, LOG_RATIO_DROP, None, cp_group, group)
            errors[f"{layout}/fipo-{normalizer}"] = _err(
                loss, grad, FIPO_DROP_LOSS[normalizer], torch.tensor(FIPO_DROP_GRAD_SUM, dtype=torch.float64) / denom)
        for mode in MODES:
            loss, grad = _summed(correction_config(mode), tokens, LOG_RATIO, LOG_RHO, cp_group, group)
            errors[f"{layout}/{mode}"] = _err(loss, grad, CORRECTION_LOSS[mode], correction_grad(mode))
            got = mismatch_metrics(mode, MismatchConfig(), logp_old[tokens], (logp_old - LOG_RHO)[tokens],
                                   torch.ones(len(tokens), dtype=torch.bool), SEQ[tokens], 4, group)
            want = {**MISMATCH, "mismatch/masked_frac": MASKED_FRAC[mode]}
            if mode in CAPPED_FRAC:
                want["mismatch/capped_frac"] = CAPPED_FRAC[mode]
            assert set(got) == set(want), (sorted(got), sorted(want))
            errors[f"{layout}/metrics-{mode}"] = max(abs(got[k] - v) for k, v in want.items())
    tb = toy_batch()
    mine = tb.seq_index % world == rank  # responses round robin: both prompt groups span the ranks
    inputs = tb.credit_inputs(torch.float64)
    for name in ("advantages", "mask", "seq_index", "token_ids", "logp", "entropy"):
        setattr(inputs, name, getattr(inputs, name)[mine])
    for (variant, c), (w, _) in PPL.items():
        values = LowProbCredit(LowProbConfig(alpha=c, variant=variant)).assign(inputs, group=group).values
        want = torch.tensor(w, dtype=torch.float64)[inputs.seq_index]
        errors[f"dp/lowprob-{variant}"] = float((values.double() - want).abs().max())
    # as the credit pipeline sees it: every token on every rank, log π_old only on the owned ones
    # (zeros elsewhere), owned = whole responses (DP) or tokens of every response (CP)
    for layout, owned in (("dp", tb.seq_index % world == rank), ("cp", torch.arange(26) % world == rank)):
        inputs = tb.credit_inputs(torch.float64)
        inputs.logp = torch.where(owned, inputs.logp, torch.zeros_like(inputs.logp))
        inputs.owned = owned
        for (variant, c), (w, _) in PPL.items():
            values = LowProbCredit(LowProbConfig(alpha=c, variant=variant)).assign(inputs, group=group).values
            want = torch.tensor(w, dtype=torch.float64)[tb.seq_index]
            errors[f"{layout}/lowprob-owned-{variant}"] = float((values.double() - want)[owned].abs().max())
    worst = torch.tensor(list(errors.values()), dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)  # every rank's local values
    return dict(zip(errors, worst.tolist()))
