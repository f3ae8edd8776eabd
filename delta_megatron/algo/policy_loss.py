"""One entry point for every policy loss: token loss → credit weights → global aggregation (+KL).

The actor calls :func:`policy_loss` once per micro-batch with flat per-token tensors of the local
tokens and a :class:`LossNormalizer` holding mini-batch totals. The result is the micro-batch's
share of the mini-batch loss, so summing (or back-propagating) over micro-batches and DP ranks gives
exactly the loss of the whole mini-batch. Metrics are returned the same way: shares of global
token means that simply add up.

Credit multipliers (DelTA λ̄, counterfactual w) scale the per-token loss; for a positive weight this
equals scaling the advantage for PPO-clip, dual clip, SAPO and FIPO (baselines.md §12).
"""

from __future__ import annotations

import torch

from delta_megatron.algo.aggregation import aggregation_weights
from delta_megatron.algo.config import AlgoConfig
from delta_megatron.algo.kl import kl_penalty
from delta_megatron.algo.loss_api import POLICY_LOSSES, PolicyLossInputs


def policy_loss(cfg: AlgoConfig, inp: PolicyLossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (loss share of this micro-batch, metric shares). Metrics are detached tensors."""
    out, mask = POLICY_LOSSES.get(cfg.loss.name)(cfg.loss, inp)
    coef = aggregation_weights(cfg.resolved_aggregation, mask, inp.seq_index, inp.seq_lengths,
                               inp.normalizer)
    token_loss = out.loss if inp.token_weight is None else out.loss * inp.token_weight
    pg_loss = (coef * token_loss).sum()
    loss = pg_loss

    share = inp.mask.to(torch.float32) / max(inp.normalizer.num_tokens, 1.0)  # global token mean
    with torch.no_grad():
        metrics = {
            "pg_loss": pg_loss.detach(),
            "clip_frac": (share * out.clipped).sum(),
            "dual_clip_frac": (share * out.dual_clipped).sum(),
            "ppo_kl": (share * (inp.logp_old - inp.logp).detach()).sum(),
            "ratio_mean": (share * out.ratio).sum(),
        }
    if cfg.kl.estimator != "none":
        if inp.ref_logp is None:
            raise ValueError("algo.kl.estimator is set but no reference log-probs were supplied")
        kl = kl_penalty(inp.logp, inp.ref_logp, cfg.kl.estimator)
        kl_loss = (coef * kl).sum()
        loss = loss + cfg.kl.coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach()
    return loss, metrics
