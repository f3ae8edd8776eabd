"""Selective test-time extrapolation (Beyond Magnitude, baselines.md §9.3): a decoding helper.

RL moves log-probs in a direction Δlog p = log π_RL − log π_Base; extrapolating further along it,
log π_Extra ∝ (1+γ) log π_RL − γ log π_Base (= π_RL re-weighted by exp(γ·Δlog p)), helps where the
two models disagree. It is applied only where the base model's sampled token y* has Δ(y*) <= τ:

1. Δ = logp_RL(y*) − logp_Base(y*) (y* missing from the RL top-k -> the RL's smallest returned logp);
2. if Δ <= τ, resample among the base model's returned candidates with logits
   w_B·logp_B + w_RL·logp_RL, (w_B, w_RL) = (−γ, 1+γ) normalised to sum 1, divided by T, then top-p
   (drop the ascending tail whose cumulative mass is <= 1 − top_p, always keeping the top token);
3. otherwise keep y*. γ = 0 gives "selective replace".

Pure functions on log-prob vectors; the serving loop that runs both models lives with the rollout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from delta_megatron.utils.configs import Section, option


@dataclass
class ExtrapolationConfig(Section):
    """§9.3 defaults (DAPO-Qwen-32B over Qwen2.5-32B): τ = −0.3, γ = 0.05, T = 1, top-p 0.7. The
    reference asks each model for its top-50 log-probs; the caller passes what the models returned."""

    tau: float = option(-0.3, "resample when Δlog p of the base model's token <= τ", unbounded=True)
    gamma: float = option(0.05, "extrapolation strength γ", ge=0)
    temperature: float = option(1.0, "sampling temperature T", gt=0)
    top_p: float = option(0.7, "nucleus sampling mass", gt=0, le=1)


def align_logprobs(candidate_ids: torch.Tensor, ids: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """Log-probs of ``candidate_ids`` [K] from a model that returned (``ids`` [M], ``logp`` [M]);
    ids it did not return get its smallest returned log-prob (step 2)."""
    hit = candidate_ids[:, None] == ids[None, :]  # [K, M]
    found = hit.any(dim=1)
    picked = torch.where(hit, logp[None, :], torch.zeros((), dtype=logp.dtype)).sum(dim=1)
    return torch.where(found, picked, logp.min())


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the ascending-sorted tail whose cumulative mass is <= 1 − top_p (the top token always
    survives) and renormalise. probs: [K]."""
    sorted_p, order = torch.sort(probs)  # ascending
    drop_sorted = torch.cumsum(sorted_p, dim=0) <= 1.0 - top_p
    drop_sorted[-1] = False
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    kept = torch.where(drop, torch.zeros_like(probs), probs)
    return kept / kept.sum()


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
    return ExtrapolationStep(True, delta, base_ids, top_p_filter(extra, cfg.top_p), extra)
