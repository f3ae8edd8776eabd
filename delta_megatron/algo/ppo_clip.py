"""PPO-clip with DAPO's decoupled clip-higher and the dual clip (baselines.md §0.2, §3).

L1 = −A·r, L2 = −A·clip(r, 1−ε_low, 1+ε_high), L = max(L1, L2); for A < 0 also L = min(L, −A·c).
The log-ratio is clamped to [−20, 20] before exp. A token whose L comes from the clipped branch or
the dual-clip bound has zero gradient; those flags feed the clip-fraction metrics.
"""

from __future__ import annotations

import torch

from delta_megatron.algo.loss_api import POLICY_LOSSES, PolicyLossInputs, TokenLoss


def log_ratio(logp: torch.Tensor, logp_old: torch.Tensor) -> torch.Tensor:
    return torch.clamp(logp - logp_old, -20.0, 20.0)


def ppo_clip_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                  clip_low: float = 0.2, clip_high: float = 0.28,
                  dual_clip_c: float | None = 10.0) -> TokenLoss:
    ratio = torch.exp(log_ratio(logp, logp_old))
    return ppo_clip_from_ratio(ratio, advantages, clip_low, clip_high, dual_clip_c)


def ppo_clip_from_ratio(ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float,
                        clip_high: float, dual_clip_c: float | None) -> TokenLoss:
    """The clip logic on a given (differentiable) ratio; shared by PPO, GSPO-token and FIPO."""
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(loss_unclipped, loss_clipped)
    clipped = loss_clipped > loss_unclipped
    dual = torch.zeros_like(clipped)
    if dual_clip_c is not None:
        bound = -advantages * dual_clip_c
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)
    return TokenLoss(loss=loss, clipped=clipped & ~dual, dual_clipped=dual, ratio=ratio.detach())


@POLICY_LOSSES.register("ppo")
def _ppo(cfg, inp: PolicyLossInputs) -> tuple[TokenLoss, torch.Tensor]:
    return ppo_clip_loss(inp.logp, inp.logp_old, inp.advantages, cfg.clip_low, cfg.clip_high,
                         cfg.dual_clip_c), inp.mask
