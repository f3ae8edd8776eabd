"""Outcome advantage estimators (baselines.md §0.1, §2): GRPO, Dr.GRPO and RLOO.

Each maps per-response scalar rewards and prompt-group ids to one advantage per response; the
actor broadcasts it to the response's tokens. All three follow verl's conventions (unbiased std,
eps 1e-6, a group of one gets mean 0 and std 1).
"""

from __future__ import annotations

import torch

from delta_megatron.utils.registry import Registry

ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator")


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor, unbiased: bool):
    """Per-response group mean, std and size, computed with scatter ops (no Python loop over groups)."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    r = rewards.to(torch.float64)
    size = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(r))
    total = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, r)
    mean = total / size
    sq = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, (r - mean[inverse]) ** 2)
    denom = (size - 1).clamp(min=1) if unbiased else size
    std = (sq / denom).sqrt()
    single = size == 1  # verl: a group of one has mean 0 and std 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return mean[inverse], std[inverse], size[inverse]


@ADVANTAGE_ESTIMATORS.register("grpo")
def grpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6,
                    std: str = "unbiased", norm_by_std: bool = True) -> torch.Tensor:
    """A_i = (R_i − mean_g R) / (std_g R + eps) (DeepSeekMath; verl ``grpo``)."""
    mean, sd, _ = _group_stats(rewards, group_ids, unbiased=(std == "unbiased"))
    adv = rewards.to(torch.float64) - mean
    if norm_by_std:
        adv = adv / (sd + eps)
    return adv.to(torch.float32)


@ADVANTAGE_ESTIMATORS.register("drgrpo")
def drgrpo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6,
                      std: str = "unbiased", norm_by_std: bool = False) -> torch.Tensor:
    """Dr.GRPO: A_i = R_i − mean_g R (no std normalisation, baselines.md §2)."""
    return grpo_advantages(rewards, group_ids, eps, std, norm_by_std=norm_by_std)


@ADVANTAGE_ESTIMATORS.register("rloo")
def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6,
                    std: str = "unbiased", norm_by_std: bool = False) -> torch.Tensor:
    """RLOO: A_i = R_i − mean_{j≠i} R_j = G/(G−1)·(R_i − mean_g R); a group of one keeps A_i = R_i."""
    mean, _, size = _group_stats(rewards, group_ids, unbiased=True)
    r = rewards.to(torch.float64)
    scale = torch.where(size > 1, size / (size - 1).clamp(min=1), torch.ones_like(size))
    return (scale * (r - mean)).to(torch.float32)
