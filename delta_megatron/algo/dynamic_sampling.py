"""DAPO dynamic sampling group filter (baselines.md §3).

A prompt group is kept iff the std of its per-response metric (0/1 correctness, not the shaped
reward) is > 0 or the group has a single response. The trainer accumulates kept groups over up to
``max_gen_batches`` generation rounds and truncates to the target count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from delta_megatron.utils.configs import fail


@dataclass
class DynamicSamplingConfig:
    enabled: bool = False
    metric: str = "acc"  # per-response field whose group std decides
    max_gen_batches: int = 10  # ≤ 0: unlimited
    gen_batch_multiplier: int = 3  # prompts generated per round = multiplier × prompts_per_step

    def validate(self) -> None:
        if self.gen_batch_multiplier < 1:
            fail("gen_batch_multiplier", self.gen_batch_multiplier, "must be >= 1")


def keep_groups(metric: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Boolean per response: does its group carry signal (std > 0, or a group of one)?"""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n = int(inverse.max()) + 1 if inverse.numel() else 0
    m = metric.to(torch.float64)
    lo = torch.full((n,), float("inf"), dtype=torch.float64).scatter_reduce(0, inverse, m, "amin")
    hi = torch.full((n,), float("-inf"), dtype=torch.float64).scatter_reduce(0, inverse, m, "amax")
    size = torch.zeros(n, dtype=torch.long).index_add_(0, inverse, torch.ones_like(inverse))
    keep = (hi > lo) | (size == 1)
    return keep[inverse]
