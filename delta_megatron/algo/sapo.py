"""SAPO (baselines.md §5): a smooth sigmoid gate on the token ratio instead of a hard clip.

τ = τ_pos for A > 0 else τ_neg; f(r) = σ(τ(r−1))·4/τ; L = −f(r)·A. The gradient weight on
∇log π is r·sech²(τ(r−1)/2), exactly 1 at r = 1, decaying as r moves away.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from delta_megatron.algo.loss_api import POLICY_LOSSES, PolicyLossInputs, TokenLoss
from delta_megatron.algo.ppo_clip import log_ratio
from delta_megatron.utils.configs import Section, option


@dataclass
class SAPOConfig(Section):
    tau_pos: float = option(1.0, "gate temperature τ for positive advantages", gt=0)
    tau_neg: float = option(1.05, "gate temperature τ for negative advantages", gt=0)


def sapo_gate(ratio: torch.Tensor, advantages: torch.Tensor, tau_pos: float,
              tau_neg: float) -> torch.Tensor:
    tau = torch.where(advantages > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    return torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau


def sapo_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
              tau_pos: float = 1.0, tau_neg: float = 1.05) -> TokenLoss:
    ratio = torch.exp(log_ratio(logp, logp_old))
    loss = -sapo_gate(ratio, advantages, tau_pos, tau_neg) * advantages
    none = torch.zeros_like(ratio, dtype=torch.bool)
    return TokenLoss(loss=loss, clipped=none, dual_clipped=none, ratio=ratio.detach())


@POLICY_LOSSES.register("sapo")
def _sapo(cfg, inp: PolicyLossInputs) -> tuple[TokenLoss, torch.Tensor]:
    return sapo_loss(inp.logp, inp.logp_old, inp.advantages, cfg.sapo.tau_pos, cfg.sapo.tau_neg), inp.mask
