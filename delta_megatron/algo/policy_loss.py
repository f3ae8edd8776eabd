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

from dataclasses import dataclass

import torch

from delta_megatron.algo.aggregation import LossNormalizer, aggregation_weights
from delta_megatron.algo.config import AlgoConfig
from delta_megatron.algo.fipo import fipo_loss
from delta_megatron.algo.gspo import gspo_loss
from delta_megatron.algo.kl import kl_penalty
from delta_megatron.algo.ppo_clip import ppo_clip_loss
from delta_megatron.algo.sapo import sapo_loss


@dataclass
class PolicyLossInputs:
    logp: torch.Tensor  # [tokens] current log p(y_t), requires grad
    logp_old: torch.Tensor  # [tokens]
    advantages: torch.Tensor  # [tokens] (after additive/multiplicative credit transforms)
    mask: torch.Tensor  # [tokens] bool
    # [tokens] long, sequence index 0..num_seqs-1; under CP it must number the micro-batch's sequences
    # identically on every CP rank (GSPO all-reduces per-sequence sums), even for sequences a rank
    # holds no token of
    seq_index: torch.Tensor
    seq_lengths: torch.Tensor  # [num_seqs] valid tokens of each whole response
    num_seqs: int
    normalizer: LossNormalizer
    token_weight: torch.Tensor | None = None  # [tokens] credit multiplier (λ̄, w), > 0
    ref_logp: torch.Tensor | None = None  # [tokens] for a KL loss
    cp_group: object = None  # context-parallel group for sequence-level reductions (GSPO, FIPO)
    # [tokens] long, the tokens' global order (e.g. their index in the rollout batch): FIPO under CP
    # rebuilds each response's token order from it across the CP ranks
    token_index: torch.Tensor | None = None


def policy_loss(cfg: AlgoConfig, inp: PolicyLossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (loss share of this micro-batch, metric shares). Metrics are detached tensors."""
    loss_cfg = cfg.loss
    mask = inp.mask
    if loss_cfg.name == "ppo":
        out = ppo_clip_loss(inp.logp, inp.logp_old, inp.advantages, loss_cfg.clip_low,
                            loss_cfg.clip_high, loss_cfg.dual_clip_c)
    elif loss_cfg.name == "gspo":
        out = gspo_loss(inp.logp, inp.logp_old, inp.advantages, mask, inp.seq_index, inp.num_seqs,
                        loss_cfg.gspo.clip_low, loss_cfg.gspo.clip_high, inp.cp_group)
    elif loss_cfg.name == "sapo":
        out = sapo_loss(inp.logp, inp.logp_old, inp.advantages, loss_cfg.sapo.tau_pos,
                        loss_cfg.sapo.tau_neg)
    elif loss_cfg.name == "fipo":
        if inp.cp_group is not None and inp.token_index is None:
            raise ValueError("FIPO under context parallelism needs PolicyLossInputs.token_index "
                             "(the future-KL suffix sum crosses CP chunks)")
        out, mask = fipo_loss(inp.logp, inp.logp_old, inp.advantages, mask, inp.seq_index,
                              inp.num_seqs, loss_cfg.fipo, loss_cfg.clip_low, loss_cfg.clip_high,
                              loss_cfg.dual_clip_c, cp_group=inp.cp_group, token_index=inp.token_index)
    else:
        raise ValueError(f"unknown policy loss {loss_cfg.name!r}")

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
