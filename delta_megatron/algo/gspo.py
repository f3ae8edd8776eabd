"""GSPO, token form (baselines.md §4): a length-normalised sequence ratio with token gradients.

s_i = exp(mean_t ℓ_{i,t}); s_{i,t} = sg[s_i]·π_θ(y_t)/sg[π_θ(y_t)] has value s_i and gradient
s_i·∇log π_θ(y_t), so it accepts token-level advantages (KTAE, DelTA). The combined log s_{i,t} is
clamped at ≤ 10 (verl): past the clamp the gradient is exactly 0 (clamping only sg[log s_i] would
leave e^10·∇log π, unbounded for A < 0 since there is no dual clip). Under context parallelism the
per-sequence (Σℓ, count) is all-reduced over the CP group — on detached values only, since the
gradient never flows through s_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from delta_megatron.algo.loss_api import POLICY_LOSSES, PolicyLossInputs, TokenLoss
from delta_megatron.algo.ppo_clip import ppo_clip_from_ratio
from delta_megatron.utils.configs import Section, option


@dataclass
class GSPOConfig(Section):
    clip_low: float = option(3e-4, "sequence-ratio clip ε_low", ge=0, le=1)
    clip_high: float = option(4e-4, "sequence-ratio clip ε_high", ge=0)


def gspo_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, seq_index: torch.Tensor, num_seqs: int,
              clip_low: float = 3e-4, clip_high: float = 4e-4, cp_group=None) -> TokenLoss:
    lr = (logp - logp_old).detach() * mask
    sums = torch.zeros(num_seqs, dtype=torch.float64).index_add_(0, seq_index, lr.double())
    counts = torch.zeros(num_seqs, dtype=torch.float64).index_add_(0, seq_index, mask.double())
    if cp_group is not None:
        packed = torch.stack([sums, counts])
        dist.all_reduce(packed, group=cp_group)
        sums, counts = packed[0], packed[1]
    log_s = (sums / counts.clamp(min=1)).to(logp.dtype)[seq_index]
    ratio = torch.exp(torch.clamp(log_s + logp - logp.detach(), max=10.0))  # value s_i, grad s_i ∇logπ
    return ppo_clip_from_ratio(ratio, advantages, clip_low, clip_high, dual_clip_c=None)


@POLICY_LOSSES.register("gspo")
def _gspo(cfg, inp: PolicyLossInputs) -> tuple[TokenLoss, torch.Tensor]:
    return gspo_loss(inp.logp, inp.logp_old, inp.advantages, inp.mask, inp.seq_index, inp.num_seqs,
                     cfg.gspo.clip_low, cfg.gspo.clip_high, inp.cp_group), inp.mask
