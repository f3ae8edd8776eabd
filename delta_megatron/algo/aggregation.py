"""Loss aggregation with GLOBAL normalisers (baselines.md §0.3; NeMo-RL's loss contract).

Every aggregation mode is written as a per-token coefficient ``c_t`` computed from normalisers of
the whole mini-batch (all data-parallel ranks, all micro-batches), so the loss of a mini-batch is
``Σ_t c_t·L_t`` summed over any split: gradient accumulation is exact, and the loss does not depend
on how the batch is cut into micro-batches or DP shards.
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


def normalizer_from_batch(mask: torch.Tensor, seq_index: torch.Tensor, loss_const: float = 1.0,
                          const_times_seqs: bool = True, dp_group=None) -> LossNormalizer:
    """Totals of a (local) mini-batch, summed over ``dp_group`` when given."""
    totals = torch.tensor([float(mask.sum()), float(torch.unique(seq_index[mask]).numel())],
                          dtype=torch.float64)
    if dp_group is not None:
        import torch.distributed as dist

        dist.all_reduce(totals, group=dp_group)
    return LossNormalizer(float(totals[0]), float(totals[1]), loss_const, const_times_seqs)
