"""DAPO dynamic sampling group filter (baselines.md §3).

A prompt group is kept iff the std of its per-response metric (0/1 correctness, not the shaped
reward) is > 0 or the group has a single response. :func:`collect_informative_groups` accumulates
kept groups over up to ``max_gen_batches`` generation rounds and truncates to the target count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from delta_megatron.batch import RolloutBatch
from delta_megatron.utils.configs import Section, option


@dataclass
class DynamicSamplingConfig(Section):
    enabled: bool = option(False, "keep only prompt groups whose metric varies (DAPO)")
    metric: Literal["acc", "reward"] = option(
        "acc", "per-response value whose group std decides: acc (0/1 correctness, DAPO) or reward (the "
               "verifier's value, e.g. partial credit, before overlong shaping)")
    max_gen_batches: int = option(10, "generation rounds before giving up; 0 = unlimited", ge=0)
    gen_batch_multiplier: int = option(3, "prompts per round = multiplier x train.prompts_per_step", ge=1)


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


METRIC_FIELDS = {"acc": "acc", "reward": "acc_reward"}  # batch fields the verifier stage writes


def collect_informative_groups(draw: Callable[[int, int], RolloutBatch], want: int,
                               cfg: DynamicSamplingConfig) -> tuple[RolloutBatch, dict[str, float]]:
    """DAPO's rounds: ``draw(round, prompts)`` returns a verified batch of ``prompts`` new prompt
    groups (``multiplier × want`` per round); groups with signal are kept across rounds until
    ``want`` are collected; the surplus of the last round is dropped (the data cursor has moved past
    it, as in DAPO). Returns exactly ``want`` groups in generation order, and the round counters."""
    per_round = want * cfg.gen_batch_multiplier
    field = METRIC_FIELDS[cfg.metric]
    kept: list[RolloutBatch] = []
    groups_kept, generated, round_ = 0, 0, 0
    while groups_kept < want:
        part = draw(round_, per_round)
        generated += per_round
        round_ += 1
        keep = keep_groups(part[field], part["group_id"])
        kept.append(part.select(keep.nonzero().flatten().tolist()))
        groups_kept += int(torch.unique(part["group_id"][keep]).numel())
        if 0 < cfg.max_gen_batches <= round_ and groups_kept < want:
            raise RuntimeError(
                f"dynamic sampling: only {groups_kept} of {want} prompt groups had varying "
                f"correctness after {round_} rounds of {per_round} prompts; raise "
                "algo.dynamic_sampling.max_gen_batches or gen_batch_multiplier, or use easier data")
    batch = RolloutBatch.concat(kept)
    ids = torch.unique(batch["group_id"])[:want]
    batch = batch.select(torch.isin(batch["group_id"], ids).nonzero().flatten().tolist())
    stats = {"rollout/gen_rounds": float(round_), "rollout/prompts_generated": float(generated),
             "rollout/informative_group_frac": groups_kept / generated}
    return batch, stats
