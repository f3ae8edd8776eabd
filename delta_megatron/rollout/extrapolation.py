"""Selective test-time extrapolation (Beyond Magnitude, baselines.md §9.3): the decoding step.

RL moves log-probs in a direction Δlog p = log π_RL − log π_Base; extrapolating further along it,
log π_Extra ∝ (1+γ) log π_RL − γ log π_Base (= π_RL re-weighted by exp(γ·Δlog p)), helps where the
two models disagree. It is applied only where the base model's sampled token y* has Δ(y*) <= τ:

1. the base model samples y* at temperature T with top-p; each model "returns" its top-k log-probs
   (k = ``num_logprobs``, 50), computed from the raw logits as vLLM returns them;
2. Δ = logp_RL(y*) − logp_Base(y*) (y* missing from the RL top-k -> the RL's smallest returned logp);
3. if Δ <= τ, resample among the base model's returned candidates with logits
   w_B·logp_B + w_RL·logp_RL, (w_B, w_RL) = (−γ, 1+γ) normalised to sum 1, divided by T, then top-p
   (drop the ascending tail whose cumulative mass is <= 1 − top_p, always keeping the top token);
4. otherwise keep y*. γ = 0 gives "selective replace".

:func:`selective_extrapolation` is one step of one sequence on the returned (ids, log-probs), as the
reference code does it; :func:`extrapolation_step` is the same step on a batch of full-vocabulary
logits, which :class:`~delta_megatron.rollout.extrapolating.ExtrapolatingEngine` runs at every
decoding step. The other selection rules (``kl``, ``entropy``, ``random``, ``all``, ``none``) are the
paper's token-replacement baselines, used by ``delta-megatron analyze dlogp``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from delta_megatron.utils.configs import Section, fail, option

Selection = Literal["dlogp", "kl", "entropy", "random", "all", "none"]


@dataclass
class ExtrapolationConfig(Section):
    """§9.3 defaults (DAPO-Qwen-32B over Qwen2.5-32B): τ = −0.3, γ = 0.05, T = 1, top-p 0.7, 50 logprobs
    (the candidates :class:`~delta_megatron.rollout.extrapolating.ExtrapolatingEngine` takes per step)."""

    tau: float = option(-0.3, "resample where Δlog p of the base model's sample is <= tau (select=dlogp)",
                        unbounded=True)
    gamma: float = option(0.05, "extrapolation: weights (−γ, 1+γ) on (log π_Base, log π_RL); 0 = replace",
                          ge=0)
    temperature: float = option(1.0, "sampling temperature of both the base sample and the resample", gt=0)
    top_p: float = option(0.7, "top-p of both the base sample and the resample", gt=0, le=1)
    num_logprobs: int = option(50, "candidates: the top-k log-probs each model returns per step", ge=1)
    select: Selection = option("dlogp", "positions to resample: dlogp (§9.3: Δ <= tau), kl (KL(RL‖Base) "
                               ">= threshold), entropy (base entropy >= threshold), random (probability "
                               "threshold), all, none")
    threshold: float | None = option(None, "threshold of select=kl / entropy, probability of select=random",
                                      unbounded=True)

    def validate(self) -> None:
        if self.select in ("kl", "entropy", "random") and self.threshold is None:
            fail("threshold", self.threshold, f"select={self.select!r} needs a threshold")
        if self.select == "random" and not 0.0 <= self.threshold <= 1.0:
            fail("threshold", self.threshold, "select='random' takes a probability in [0, 1]")

    @property
    def weights(self) -> tuple[float, float]:
        """(w_B, w_RL) = (−γ, 1+γ) normalised to sum 1 (they already do; kept as the code states it)."""
        w_b, w_rl = -self.gamma, 1.0 + self.gamma
        return w_b / (w_b + w_rl), w_rl / (w_b + w_rl)


def align_logprobs(candidate_ids: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Log-probs of ``candidate_ids`` [K] from a model that returned (``ids`` [M], ``logp`` [M]);
    ids it did not return get its smallest returned log-prob (step 2)."""
    hit = candidate_ids[:, None] == ids[None, :]  # [K, M]
    found = hit.any(dim=1)
    picked = torch.where(hit, logp[None, :], torch.zeros((), dtype=logp.dtype)).sum(dim=1)
    return torch.where(found, picked, logp.min())


def top_p_filter(probs: torch.Tensor, top_p: float, tiebreak: torch.Tensor | None = None) -> torch.Tensor:
    """Zero the ascending-sorted tail whose cumulative mass is <= 1 − top_p (the top token always
    survives) and renormalise, along the last dim. probs: [..., K].

    Equal probabilities are common in the resample (every candidate missing from the RL top-k gets the
    same padded log-prob), and the cut may fall inside such a tie; the reference leaves that to numpy's
    argsort. Here the order is defined: ties go by ascending ``tiebreak`` (the base model's log-prob:
    the base's least likely candidate is dropped first), then by position."""
    if tiebreak is None:
        sorted_p, order = torch.sort(probs, dim=-1, stable=True)  # ascending
    else:
        pre = torch.argsort(tiebreak, dim=-1, stable=True)
        sorted_p, inner = torch.sort(probs.gather(-1, pre), dim=-1, stable=True)
        order = pre.gather(-1, inner)
    drop_sorted = torch.cumsum(sorted_p, dim=-1) <= 1.0 - top_p
    drop_sorted[..., -1] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    kept = torch.where(drop, torch.zeros_like(probs), probs)
    return kept / kept.sum(dim=-1, keepdim=True)


def extrapolated_probs(logp_base: torch.Tensor, logp_rl: torch.Tensor, gamma: float,
                       temperature: float = 1.0) -> torch.Tensor:
    """softmax((w_B·logp_B + w_RL·logp_RL) / T) with (w_B, w_RL) = (−γ, 1+γ)/1 over aligned [K] vectors."""
    w_b, w_rl = -gamma, 1.0 + gamma
    total = w_b + w_rl
    logits = (w_b / total) * logp_base + (w_rl / total) * logp_rl
    return torch.softmax(logits / temperature, dim=-1)


@dataclass
class ExtrapolationStep:
    resample: bool  # Δ(y*) <= τ
    delta: float  # Δlog p of the base model's sampled token
    candidate_ids: torch.Tensor  # [K] the base model's returned ids
    probs: torch.Tensor  # [K] distribution to sample from (one-hot on y* when not resampling)
    extrapolated: torch.Tensor  # [K] before top-p (zeros when not resampling)


def selective_extrapolation(base_ids: torch.Tensor, base_logp: torch.Tensor, rl_ids: torch.Tensor,
                            rl_logp: torch.Tensor, sampled_id: int,
                            cfg: ExtrapolationConfig | None = None) -> ExtrapolationStep:
    """One decoding step of §9.3 from the two models' returned top-k (ids, log-probs).

    ``sampled_id`` is the base model's sample y* (it is among ``base_ids``)."""
    cfg = cfg or ExtrapolationConfig()
    base_logp, rl_logp = base_logp.double(), rl_logp.double()
    rl_on_base = align_logprobs(base_ids, rl_ids, rl_logp)  # [K]
    at = (base_ids == sampled_id).nonzero().flatten()
    if at.numel() == 0:
        raise ValueError(f"sampled id {sampled_id} is not among the base model's candidates")
    j = int(at[0])
    delta = float(rl_on_base[j] - base_logp[j])
    if delta > cfg.tau:
        onehot = torch.zeros_like(base_logp)
        onehot[j] = 1.0
        return ExtrapolationStep(False, delta, base_ids, onehot, torch.zeros_like(base_logp))
    extra = extrapolated_probs(base_logp, rl_on_base, cfg.gamma, cfg.temperature)
    return ExtrapolationStep(True, delta, base_ids, top_p_filter(extra, cfg.top_p, base_logp), extra)


# ---------------------------------------------------------------------------------------- batched


def sample_with_uniforms(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one index per row of ``probs`` [B, V] with ``u`` [B] in [0, 1): each row's
    draw is a function of its own uniform, so a caller that keeps one generator per row gets samples
    that do not depend on the rest of the batch. Zero-probability entries are never drawn."""
    cdf = probs.cumsum(dim=-1)
    idx = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[:, -1])[:, None], right=True).squeeze(1)
    last_positive = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(dim=-1)
    return torch.minimum(idx, last_positive)


def token_entropy(logp: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary entropy of each row of log-probs [B, V] -> [B]."""
    return -(logp.exp() * logp).sum(dim=-1)


def token_kl(logp_p: torch.Tensor, logp_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) of each row [B, V] -> [B] (full vocabulary)."""
    return (logp_p.exp() * (logp_p - logp_q)).sum(dim=-1)


def resample_probs(logp_base: torch.Tensor, logp_rl_aligned: torch.Tensor, candidates: torch.Tensor,
                   cfg: ExtrapolationConfig) -> torch.Tensor:
    """Step 3 on a batch: softmax((w_B·logp_B + w_RL·logp_RL) / T) over each row's ``candidates``
    [B, V] (bool), then top-p. ``logp_rl_aligned`` already carries the step-2 padding."""
    w_b, w_rl = cfg.weights
    logits = w_b * logp_base + w_rl * logp_rl_aligned
    logits = logits.masked_fill(~candidates, float("-inf"))
    return top_p_filter(torch.softmax(logits / cfg.temperature, dim=-1), cfg.top_p, logp_base)


@dataclass
class StepOutcome:
    """One batched decoding step (all [B])."""

    tokens: torch.Tensor  # emitted token
    base_tokens: torch.Tensor  # the base model's sample y*
    selected: torch.Tensor  # bool: the position was resampled
    delta: torch.Tensor  # Δ(y*) with the step-2 padding


def select_positions(cfg: ExtrapolationConfig, delta: torch.Tensor, logp_base: torch.Tensor,
                     logp_rl: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Which rows resample, by ``cfg.select`` (entropy and KL on the raw, full-vocabulary logits)."""
    if cfg.select == "dlogp":
        return delta <= cfg.tau
    if cfg.select == "kl":
        return token_kl(logp_rl, logp_base) >= cfg.threshold
    if cfg.select == "entropy":
        return token_entropy(logp_base) >= cfg.threshold
    if cfg.select == "random":
        return u < cfg.threshold
    return torch.full_like(delta, cfg.select == "all", dtype=torch.bool)


def extrapolation_step(base_logits: torch.Tensor, rl_logits: torch.Tensor, cfg: ExtrapolationConfig,
                       uniforms: torch.Tensor) -> StepOutcome:
    """Steps 1–4 for a batch of next-token logits [B, V] of the two models; ``uniforms`` [B, 3] drive
    the base sample, the ``random`` selection and the resample (always all three, so a row's draws
    do not depend on what was selected)."""
    dtype = torch.float64 if base_logits.dtype == torch.float64 else torch.float32
    base_logits, rl_logits = base_logits.to(dtype), rl_logits.to(dtype)
    uniforms = uniforms.to(device=base_logits.device, dtype=dtype)
    logp_base = torch.log_softmax(base_logits, dim=-1)  # "returned" log-probs: raw logits
    logp_rl = torch.log_softmax(rl_logits, dim=-1)
    base_probs = top_p_filter(torch.softmax(base_logits / cfg.temperature, dim=-1), cfg.top_p)
    y_star = sample_with_uniforms(base_probs, uniforms[:, 0])
    k = min(cfg.num_logprobs, base_logits.shape[-1])
    rl_top = logp_rl.topk(k, dim=-1)
    rl_returned = torch.zeros_like(logp_rl, dtype=torch.bool).scatter(-1, rl_top.indices, True)
    rl_aligned = torch.where(rl_returned, logp_rl, rl_top.values[:, -1:])  # step 2 padding
    delta = (rl_aligned.gather(-1, y_star[:, None]) - logp_base.gather(-1, y_star[:, None])).squeeze(1)
    selected = select_positions(cfg, delta, logp_base, logp_rl, uniforms[:, 1])
    # candidates: the base model's returned top-k, plus y* (vLLM returns the sampled token's log-prob too)
    candidates = torch.zeros_like(logp_base, dtype=torch.bool)
    candidates.scatter_(-1, logp_base.topk(k, dim=-1).indices, True)
    candidates.scatter_(-1, y_star[:, None], True)
    resampled = sample_with_uniforms(resample_probs(logp_base, rl_aligned, candidates, cfg), uniforms[:, 2])
    return StepOutcome(torch.where(selected, resampled, y_star), y_star, selected, delta)
