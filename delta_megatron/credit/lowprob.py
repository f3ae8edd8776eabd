"""Low-probability advantage re-weighting (Beyond Magnitude, baselines.md §9.2).

Lemma 3.1 of the paper: the logit-gradient mass of a token is 2|w|(1 − π(y_t)), so low-probability
tokens carry most of the update direction. The method leans into that with a fixed, positive
per-token factor on the advantage, computed once per rollout batch from the old policy:

    reshape_reversed (default):  w = 1 + α(1 − π_old)         Ã = w · Â
    reshape:                     w = α·π_old + 1 − α
    middle:                      w = α + π_old(1 − π_old)
    normalize:                   w = 1 / (1 + α − π_old)

(the ablation variants of the reference code, with its constant c = α). The factor applies to every
token of either sign by default; ``adv_sign`` restricts it to positive or negative advantages as the
reference's ``adv_mask`` option does. Target ``advantage_scale``; w > 0 for α in range, so it commutes
with the other multipliers (§12).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from delta_megatron.credit.base import CREDIT_METHODS, CreditInputs, CreditNeeds, CreditOutput, CreditTarget
from delta_megatron.utils.configs import check_range, fail, validate

LOWPROB_VARIANTS = ("reshape_reversed", "reshape", "middle", "normalize")


@dataclass
class LowProbConfig:
    """§9.2. α = 0.1 is the yaml default (Qwen3-8B-Base); the 7B Qwen2.5-Math script uses 0.2."""

    alpha: float = 0.1
    variant: Literal["reshape_reversed", "reshape", "middle", "normalize"] = "reshape_reversed"
    adv_sign: Literal["all", "positive", "negative"] = "all"  # which advantages are re-weighted

    def validate(self) -> None:
        if self.variant not in LOWPROB_VARIANTS:
            fail("variant", self.variant, "allowed: " + ", ".join(LOWPROB_VARIANTS))
        if self.adv_sign not in ("all", "positive", "negative"):
            fail("adv_sign", self.adv_sign, "allowed: 'all', 'positive', 'negative'")
        if self.variant == "reshape":
            check_range("alpha", self.alpha, lo=0.0, hi=1.0, hi_open=True)  # keeps w > 0
        elif self.variant == "middle":
            check_range("alpha", self.alpha, lo=0.0, lo_open=True)
        else:
            check_range("alpha", self.alpha, lo=0.0)


def lowprob_weight(pi_old: torch.Tensor, alpha: float, variant: str = "reshape_reversed") -> torch.Tensor:
    """Per-token factor w(π_old) of §9.2 (same shape and dtype as ``pi_old``)."""
    if variant == "reshape_reversed":
        return 1.0 + alpha * (1.0 - pi_old)
    if variant == "reshape":
        return alpha * pi_old + 1.0 - alpha
    if variant == "middle":
        return alpha + pi_old * (1.0 - pi_old)
    if variant == "normalize":
        return 1.0 / (1.0 + alpha - pi_old)
    raise ValueError(f"unknown low-prob variant {variant!r}; allowed: {LOWPROB_VARIANTS}")


@CREDIT_METHODS.register("lowprob")
class LowProbCredit:
    """TokenCredit for §9.2: ``values`` multiply the advantage (target ``advantage_scale``)."""

    target: CreditTarget = "advantage_scale"
    per_microbatch = False

    def __init__(self, cfg: LowProbConfig | None = None):
        self.cfg = cfg or LowProbConfig()
        validate(self.cfg, "credit.lowprob")
        self.needs = CreditNeeds(logp=True)

    def assign(self, inputs: CreditInputs, group: Any = None) -> CreditOutput:
        """Token-local: ``group`` is unused. Invalid tokens get factor 1."""
        if inputs.logp is None:
            raise ValueError("low-prob re-weighting needs the old log-probs (needs.logp)")
        pi_old = inputs.logp.double().exp()  # [tokens]
        w = lowprob_weight(pi_old, self.cfg.alpha, self.cfg.variant)
        apply = inputs.mask.bool()
        if self.cfg.adv_sign == "positive":
            apply = apply & (inputs.advantages > 0)
        elif self.cfg.adv_sign == "negative":
            apply = apply & (inputs.advantages < 0)
        w = torch.where(apply, w, torch.ones_like(w)).float()
        n = max(int(inputs.mask.sum()), 1)
        metrics = {"lowprob/weight_mean": float(w[inputs.mask.bool()].sum()) / n}
        return CreditOutput(target=self.target, values=w, metrics=metrics)
