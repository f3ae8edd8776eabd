"""One entry point for every policy loss: token loss → rollout correction → credit weights → global
aggregation (+KL).

The actor calls :func:`policy_loss` once per micro-batch with flat per-token tensors of the local
tokens and a :class:`LossNormalizer` holding mini-batch totals. The result is the micro-batch's
share of the mini-batch loss, so summing (or back-propagating) over micro-batches and DP ranks gives
exactly the loss of the whole mini-batch — times ``aggregation.kept_scale`` of the summed
``norm_dropped`` metric when a filter that runs in the forward (FIPO ``normalizer: kept``,
``seq-mask-tis``) took tokens out of the normaliser. Metrics are returned the same way: shares of
global means that simply add up; the PPO diagnostics average over all response tokens (the
reference's convention, also under a Forking selection; ``*_selected`` over the loss tokens).

Credit multipliers (DelTA λ̄, counterfactual w) and the rollout correction's weight scale the
per-token loss; for a positive weight this equals scaling the advantage for PPO-clip, dual clip,
SAPO and FIPO (baselines.md §12).
"""

from __future__ import annotations

import torch

from delta_megatron.algo.aggregation import aggregation_weights, normalizer_share
from delta_megatron.algo.config import AlgoConfig
from delta_megatron.algo.kl import kl_penalty
from delta_megatron.algo.loss_api import POLICY_LOSSES, PolicyLossInputs
from delta_megatron.algo.rollout_correction import rollout_correction

BASE_METRICS = ("pg_loss", "clip_frac", "dual_clip_frac", "ppo_kl", "ratio_mean", "kl_loss", "norm_dropped")
SELECTED_METRICS = ("clip_frac_selected", "dual_clip_frac_selected", "ppo_kl_selected")


def metric_names(selected: bool) -> tuple[str, ...]:
    """The metric shares :func:`policy_loss` returns (``selected``: a per-micro-batch selector picks
    the loss tokens), in a fixed order every rank agrees on."""
    return BASE_METRICS + (SELECTED_METRICS if selected else ())


def policy_loss(cfg: AlgoConfig, inp: PolicyLossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (loss share of this micro-batch, metric shares). Metrics are detached tensors."""
    out, mask = POLICY_LOSSES.get(cfg.loss.name)(cfg.loss, inp)
    response = inp.mask if inp.response_mask is None else inp.response_mask
    dropped = out.dropped
    kl_mask = inp.mask
    token_loss = out.loss if inp.token_weight is None else out.loss * inp.token_weight
    if cfg.rollout_correction != "none":
        corr = rollout_correction(cfg.rollout_correction, cfg.mismatch, inp.logp_old, inp.logp_rollout,
                                  response, inp.seq_index, inp.num_seqs, inp.cp_group)
        token_loss = token_loss * corr.weight.to(token_loss.dtype)
        mask, kl_mask = mask & corr.keep, kl_mask & corr.keep
        dropped = ~corr.keep if dropped is None else dropped | ~corr.keep
    mode, norm = cfg.resolved_aggregation, inp.normalizer
    coef = aggregation_weights(mode, mask, inp.seq_index, inp.seq_lengths, norm)
    pg_loss = (coef * token_loss).sum()
    loss = pg_loss

    n_resp = norm.num_response_tokens if norm.num_response_tokens is not None else norm.num_tokens
    share = response.to(torch.float32) / max(n_resp, 1.0)  # global mean over the response tokens
    with torch.no_grad():
        log_ratio = (inp.logp_old - inp.logp).detach()
        metrics = {
            "pg_loss": pg_loss.detach(),
            "clip_frac": (share * out.clipped).sum(),
            "dual_clip_frac": (share * out.dual_clipped).sum(),
            "ppo_kl": (share * log_ratio).sum(),
            "ratio_mean": (share * out.ratio).sum(),
            "norm_dropped": (normalizer_share(mode, inp.mask & dropped, inp.seq_index, inp.seq_lengths, norm)
                             if dropped is not None else torch.zeros((), dtype=torch.float64)),
        }
        if inp.response_mask is not None:  # the same diagnostics over the selected loss tokens
            sel = inp.mask.to(torch.float32) / max(norm.num_tokens, 1.0)
            metrics.update(clip_frac_selected=(sel * out.clipped).sum(),
                           dual_clip_frac_selected=(sel * out.dual_clipped).sum(),
                           ppo_kl_selected=(sel * log_ratio).sum())
    if cfg.kl.estimator != "none":
        if inp.ref_logp is None:
            raise ValueError("algo.kl.estimator is set but no reference log-probs were supplied")
        if out.dropped is not None:
            raise ValueError("algo.loss.fipo.normalizer='kept' rescales the whole gradient after the "
                             "backward; with a KL loss use 'all' (AlgoConfig.validate says so too)")
        kl = kl_penalty(inp.logp, inp.ref_logp, cfg.kl.estimator)
        kl_loss = (aggregation_weights(mode, kl_mask, inp.seq_index, inp.seq_lengths, norm) * kl).sum()
        loss = loss + cfg.kl.coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach()
    return loss, metrics
