"""Low-probability advantage re-weighting (Beyond Magnitude, baselines.md §9.2).

Lemma 3.1 of the paper: the logit-gradient mass of a token is 2|w|(1 − π(y_t)), so low-probability
tokens carry most of the update direction. The method leans into that with a fixed, positive
per-token factor on the advantage, computed once per rollout batch from the old policy:

    reshape_reversed (default):  w = 1 + α(1 − π_old)         Ã = w · Â
    reshape:                     w = α·π_old + 1 − α
    middle:                      w = α + π_old(1 − π_old)
    normalize:                   w = 1 / (1 + α − π_old)

(the ablation variants of the reference code, with its constant c = α), and the perplexity-based
sequence weights of the paper's "PPL" baseline (docs/methods/fidelity.md §4), one factor per response i
with ℓ_i = −mean_t log π_old(y_i,t) over its tokens:

    ppl:             w_i = 1 − α·ℓ_i
    ppl-norm:        w_i = 1 − α·z_i,  z_i = (ℓ_i − mean_g ℓ) / (std_g ℓ + 1e-6)
                     (population std over the responses of the same prompt)
    ppl-norm-clamp:  ppl-norm clamped to [0.8, 1.2]

The sequence variants reduce the per-response (Σ log π_old, count) over ``group`` when the tokens are
sharded (a prompt's responses may sit on different DP ranks). The factor applies to every token of
either sign by default; ``adv_sign`` restricts it to positive or negative advantages as the
reference's ``adv_mask`` option does. Target ``advantage_scale``; the token variants give w > 0 for α
in range, so they commute with the other multipliers (§12); the ``ppl`` variants are positive while
α·ℓ_i < 1 (resp. α·|z_i| < 1), which the metrics ``lowprob/weight_min`` shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from delta_megatron.credit.base import CREDIT_METHODS, CreditInputs, CreditNeeds, CreditOutput, CreditTarget
from delta_megatron.ops.reduce import all_reduce
from delta_megatron.utils.configs import Section, check_range, option, validate

TOKEN_VARIANTS = ("reshape_reversed", "reshape", "middle", "normalize")
SEQUENCE_VARIANTS = ("ppl", "ppl-norm", "ppl-norm-clamp")
LOWPROB_VARIANTS = TOKEN_VARIANTS + SEQUENCE_VARIANTS
PPL_CLAMP = (0.8, 1.2)  # ppl-norm-clamp bounds


@dataclass
class LowProbConfig(Section):
    """§9.2. α = 0.1 is the yaml default (Qwen3-8B-Base); the 7B Qwen2.5-Math script uses 0.2."""

    alpha: float = option(0.1, "re-weighting strength α (range depends on variant)", ge=0)
    variant: Literal["reshape_reversed", "reshape", "middle", "normalize", "ppl", "ppl-norm",
                     "ppl-norm-clamp"] = option(
        "reshape_reversed", "weight function: per token w(π_old) (§9.2) or per response from its perplexity")
    adv_sign: Literal["all", "positive", "negative"] = option("all", "which advantages are re-weighted")

    def validate(self) -> None:
        if self.variant == "reshape":
            check_range("alpha", self.alpha, lo=0.0, hi=1.0, hi_open=True)  # keeps w > 0
        elif self.variant == "middle":
            check_range("alpha", self.alpha, lo=0.0, lo_open=True)
        else:
            check_range("alpha", self.alpha, lo=0.0)


def ppl_weight(logp_old: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor, alpha: float,
               variant: str, group_index: torch.Tensor | None = None, num_seqs: int | None = None,
               group: Any = None) -> torch.Tensor:
    """Per-token factor of a sequence variant: w_i of the token's response (float64 [tokens]).
    ``seq_index`` holds global response ids, ``group_index`` [num_seqs] the prompt group of each
    response; ``group`` spans the ranks holding the responses' tokens."""
    if variant not in SEQUENCE_VARIANTS:
        raise ValueError(f"unknown sequence variant {variant!r}; allowed: {SEQUENCE_VARIANTS}")
    n = num_seqs if num_seqs is not None else (len(group_index) if group_index is not None
                                               else int(seq_index.max()) + 1 if seq_index.numel() else 0)
    m = mask.bool()
    sums = torch.zeros(2, n, dtype=torch.float64, device=logp_old.device)
    sums[0].index_add_(0, seq_index[m], logp_old[m].double())
    sums[1].index_add_(0, seq_index[m], torch.ones(int(m.sum()), dtype=torch.float64, device=sums.device))
    all_reduce(sums, group)
    present = sums[1] > 0
    ell = -sums[0] / sums[1].clamp(min=1)  # [num_seqs] mean negative log-likelihood ℓ_i
    if variant == "ppl":
        return (1.0 - alpha * ell)[seq_index]
    if group_index is None:
        raise ValueError(f"low-prob variant {variant!r} needs the prompt group of each response "
                         "(CreditInputs.group_index)")
    _, g = torch.unique(group_index.to(sums.device), return_inverse=True)
    size = torch.zeros(int(g.max()) + 1 if n else 0, dtype=torch.float64, device=sums.device)
    size = size.index_add(0, g, present.double())
    mean = size.new_zeros(size.shape).index_add(0, g, torch.where(present, ell, 0.0)) / size.clamp(min=1)
    dev2 = torch.where(present, (ell - mean[g]) ** 2, 0.0)
    std = (size.new_zeros(size.shape).index_add(0, g, dev2) / size.clamp(min=1)).sqrt()  # population
    w = 1.0 - alpha * (ell - mean[g]) / (std[g] + 1e-6)
    if variant == "ppl-norm-clamp":
        w = w.clamp(*PPL_CLAMP)
    return w[seq_index]


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
    raise ValueError(f"unknown low-prob token variant {variant!r}; allowed: {TOKEN_VARIANTS}")


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
        """Token variants are token-local; the sequence variants sum log π_old per response over the
        tokens this rank holds (``inputs.owned``) and over ``group`` (the ranks sharing the batch's
        tokens, None = this process holds them all). Invalid tokens get factor 1."""
        if inputs.logp is None:
            raise ValueError("low-prob re-weighting needs the old log-probs (needs.logp)")
        if self.cfg.variant in SEQUENCE_VARIANTS:
            num_seqs = len(inputs.rewards) if inputs.rewards is not None else None
            known = inputs.mask if inputs.owned is None else inputs.mask & inputs.owned
            w = ppl_weight(inputs.logp, known, inputs.seq_index, self.cfg.alpha, self.cfg.variant,
                           inputs.group_index, num_seqs, group)
        else:
            w = lowprob_weight(inputs.logp.double().exp(), self.cfg.alpha, self.cfg.variant)
        apply = inputs.mask.bool()
        if self.cfg.adv_sign == "positive":
            apply = apply & (inputs.advantages > 0)
        elif self.cfg.adv_sign == "negative":
            apply = apply & (inputs.advantages < 0)
        w = torch.where(apply, w, torch.ones_like(w)).float()
        n = max(int(inputs.mask.sum()), 1)
        valid = w[inputs.mask.bool()]
        metrics = {"lowprob/weight_mean": float(valid.sum()) / n,
                   "lowprob/weight_min": float(valid.min()) if valid.numel() else 1.0}
        return CreditOutput(target=self.target, values=w, metrics=metrics)
