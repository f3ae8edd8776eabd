"""KL estimators between the policy and a frozen reference (baselines.md §0.4).

``d = logp − ref_logp``; k1 = d, abs = |d|, k2 = ½d², k3 = e^{−d} + d − 1 (clamped as verl does).
A trailing ``+`` keeps the forward value of the estimator but routes the gradient through k2
(straight-through), which is unbiased for the KL gradient.
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "abs", "k2", "k3", "k1+", "abs+", "k3+")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate; shapes follow ``logp``."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; allowed: {', '.join(KL_ESTIMATORS)}")
    straight_through = estimator.endswith("+")
    base = estimator.rstrip("+")
    d = logp - ref_logp
    if base == "k1":
        value = d
    elif base == "abs":
        value = d.abs()
    elif base == "k2":
        value = 0.5 * d.square()
    else:  # k3, "low_var_kl"
        neg = torch.clamp(-d, -20.0, 20.0)
        value = torch.clamp(neg.exp() - neg - 1.0, -10.0, 10.0)
    if straight_through:
        k2 = 0.5 * d.square()
        value = k2 + (value - k2).detach()
    return value
