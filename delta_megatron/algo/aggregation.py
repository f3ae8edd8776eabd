"""Loss aggregation with GLOBAL normalisers (baselines.md §0.3; NeMo-RL's loss contract).

Every aggregation mode is written as a per-token coefficient ``c_t`` computed from normalisers of
the whole mini-batch (all data-parallel ranks, all micro-batches), so the loss of a mini-batch is
``Σ_t c_t·L_t`` summed over any split: gradient accumulation is exact, and the loss does not depend
on how the batch is cut into micro-batches or DP shards.

Some filters decide which tokens leave the normaliser only in the forward of the current policy
(FIPO's sequence filter with ``normalizer: kept``, the rollout correction's sequence mask), when the
global count is no longer known in advance. The loss then keeps the all-token normaliser N and
reports the fraction D of N its filters removed (:func:`normalizer_share`, additive over micro-batches
and ranks); the mini-batch loss and gradient are the summed shares times :func:`kept_scale` =
N / (N − D·N): the gradient is linear in 1/N, so one scale before clipping is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

AggregationMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                          "seq-mean-token-sum-norm"]
AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                     "seq-mean-token-sum-norm")


@dataclass(frozen=True)
class LossNormalizer:
    """Mini-batch totals, identical on every rank (the actor all-reduces them over DP before the
    first micro-batch)."""

    num_tokens: float  # valid response tokens in the mini-batch
    num_seqs: float  # responses in the mini-batch
    loss_const: float = 1.0  # Dr.GRPO constant L_const
    const_times_seqs: bool = True  # Dr.GRPO: divide by B·L_const (TRL) or by L_const (verl)
    # response tokens before a per-micro-batch selection (Forking); metrics average over them, as
    # the reference does. None: num_tokens
    num_response_tokens: float | None = None


def aggregation_weights(mode: str, mask: torch.Tensor, seq_index: torch.Tensor,
                        seq_lengths: torch.Tensor, norm: LossNormalizer) -> torch.Tensor:
    """Per-token coefficients c_t (0 on masked tokens). ``seq_lengths``: [local seqs] valid tokens of
    each whole response (counted before any context-parallel split)."""
    m = mask.to(torch.float32)
    if mode == "token-mean":
        return m / max(norm.num_tokens, 1.0)
    if mode == "seq-mean-token-mean":
        return m / (seq_lengths[seq_index].clamp(min=1).to(torch.float32) * max(norm.num_seqs, 1.0))
    if mode == "seq-mean-token-sum":
        return m / max(norm.num_seqs, 1.0)
    if mode == "seq-mean-token-sum-norm":
        denom = norm.loss_const * (norm.num_seqs if norm.const_times_seqs else 1.0)
        return m / denom
    raise ValueError(f"unknown aggregation mode {mode!r}; allowed: {', '.join(AGGREGATION_MODES)}")


def normalizer_share(mode: str, tokens: torch.Tensor, seq_index: torch.Tensor, seq_lengths: torch.Tensor,
                     norm: LossNormalizer) -> torch.Tensor:
    """The fraction of the mini-batch normaliser that ``tokens`` (bool [tokens]) make up: token count
    / N for token-mean, responses / B for the sequence means (each token of response i counts
    1/len_i, so a whole dropped response counts 1 however its tokens are split), 0 for the constant
    Dr.GRPO denominator. A float64 scalar, additive over micro-batches and ranks."""
    t = tokens.to(torch.float64)
    if mode == "token-mean":
        return t.sum() / max(norm.num_tokens, 1.0)
    if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        per_token = seq_lengths.to(torch.float64).clamp(min=1)[seq_index] * max(norm.num_seqs, 1.0)
        return (t / per_token).sum()
    if mode == "seq-mean-token-sum-norm":
        return t.new_zeros(())
    raise ValueError(f"unknown aggregation mode {mode!r}; allowed: {', '.join(AGGREGATION_MODES)}")


def kept_scale(dropped: float) -> float:
    """Loss (and gradient) scale once a fraction ``dropped`` of the normaliser left it after the
    forward: 1 / (1 − D); 1 when nothing (or everything: the loss is 0 then) was dropped."""
    kept = 1.0 - dropped
    return 1.0 / kept if dropped > 0.0 and kept > 1e-12 else 1.0


def normalizer_from_batch(mask: torch.Tensor, seq_index: torch.Tensor, loss_const: float = 1.0,
                          const_times_seqs: bool = True, dp_group=None) -> LossNormalizer:
    """Totals of a (local) mini-batch, summed over ``dp_group`` when given."""
    totals = torch.tensor([float(mask.sum()), float(torch.unique(seq_index[mask]).numel())],
                          dtype=torch.float64)
    if dp_group is not None:
        import torch.distributed as dist

        dist.all_reduce(totals, group=dp_group)
    return LossNormalizer(float(totals[0]), float(totals[1]), loss_const, const_times_seqs)
