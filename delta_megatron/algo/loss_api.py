"""The policy-loss interface: what every loss receives, what it returns, and the registry.

A loss registers an adapter ``(loss_cfg, PolicyLossInputs) -> (TokenLoss, mask)`` under its name
(``@POLICY_LOSSES.register("gspo")`` in its own file); :func:`~delta_megatron.algo.policy_loss.
policy_loss` looks it up, so ``algo.loss.name`` accepts exactly the registered names. ``mask`` is the
loss mask after the loss's own filters (FIPO's sequence filter), otherwise ``inputs.mask``; tokens a
filter takes out of the normaliser too are flagged in ``TokenLoss.dropped`` (see ``aggregation``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from delta_megatron.algo.aggregation import LossNormalizer
from delta_megatron.utils.registry import Registry

__all__ = ["TokenLoss", "PolicyLossInputs", "POLICY_LOSSES"]


@dataclass
class TokenLoss:
    """Per-token policy loss and diagnostics (all ``[tokens]``)."""

    loss: torch.Tensor
    clipped: torch.Tensor  # bool: ratio clip active (zero gradient)
    dual_clipped: torch.Tensor  # bool: dual-clip bound active (zero gradient)
    ratio: torch.Tensor  # detached ratio used by the loss
    # bool: tokens the loss's filter removed from the loss AND from its normaliser (FIPO's
    # ``normalizer: kept``); None: the normaliser keeps every token of ``inputs.mask``
    dropped: torch.Tensor | None = None


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
    # [tokens] bool, the response's loss tokens before a per-micro-batch selection (Forking): metrics
    # average over them (with ``normalizer.num_response_tokens``) and sequence statistics of the
    # rollout correction use them. None: ``mask``
    response_mask: torch.Tensor | None = None
    # [tokens] log p(y_t) the rollout engine sampled with, for ``algo.rollout_correction``
    logp_rollout: torch.Tensor | None = None


POLICY_LOSSES: Registry = Registry("policy loss")
