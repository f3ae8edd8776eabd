"""Train/inference mismatch correction (docs/methods/fidelity.md §5).

The rollout engine (SGLang's bf16/fp8 sampler) and the Megatron actor disagree on log-probs, so the
responses were sampled from π_rollout, not from the π_old the PPO ratio is taken against. With the
per-token ratio ρ_t = π_old(y_t)/π_rollout(y_t) (the engine's ``logp_rollout``, detached):

    none           no correction (default)
    tis            the per-token loss is multiplied by min(ρ_t, C)                 (truncated IS)
    icepop         tokens with ρ_t outside [low, high] get zero loss; they stay in the normaliser
    seq-mask-tis   responses whose geometric-mean ratio exp(mean_t log ρ_t) lies outside [low, high]
                   are dropped (from the loss and its normaliser), then token TIS on the rest

Each mode registers in ``ROLLOUT_CORRECTIONS``; ``algo.rollout_correction`` accepts exactly the
registered names. A correction depends only on π_old and π_rollout, so it is fixed for the rollout
batch; the sequence mask's per-response sums are reduced over the group holding the response's
tokens (CP in the train pass, DP×CP for the batch metrics), so it is exact under any layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from delta_megatron.ops.reduce import all_reduce, kth_largest
from delta_megatron.utils.configs import Section, fail, option
from delta_megatron.utils.registry import Registry

__all__ = ["ROLLOUT_CORRECTIONS", "Correction", "MismatchConfig", "mismatch_metrics", "rollout_correction",
           "rollout_ratio_log"]

ROLLOUT_CORRECTIONS: Registry = Registry("rollout correction")


@dataclass
class MismatchConfig(Section):
    """Bounds of ``algo.rollout_correction`` (the section ``algo.mismatch``)."""

    tis_cap: float = option(2.0, "tis / seq-mask-tis: cap C of the token weight min(π_old/π_rollout, C)",
                            gt=0)
    low: float = option(0.5, "icepop / seq-mask-tis: lowest ratio kept (token / geometric mean)", gt=0)
    high: float = option(2.0, "icepop / seq-mask-tis: highest ratio kept", gt=0)

    def validate(self) -> None:
        if not self.low < self.high:
            fail("low", self.low, f"must be < high={self.high}")


@dataclass
class Correction:
    """What a correction does to the local tokens (both detached)."""

    weight: torch.Tensor  # [tokens] multiplier of the per-token policy loss
    keep: torch.Tensor  # [tokens] bool: False = dropped from the loss AND its normaliser (seq mask)

    def masked(self, mask: torch.Tensor) -> torch.Tensor:
        """Tokens of ``mask`` whose loss the correction removes (zero weight or dropped)."""
        return mask & ~(self.keep & (self.weight != 0))


def rollout_ratio_log(logp_old: torch.Tensor, logp_rollout: torch.Tensor) -> torch.Tensor:
    """log ρ = log π_old − log π_rollout in float64, clamped to [−20, 20] like the PPO log-ratio."""
    return torch.clamp(logp_old.detach().double() - logp_rollout.detach().double(), -20.0, 20.0)


@ROLLOUT_CORRECTIONS.register("none")
def _none(cfg: MismatchConfig, log_rho, mask, seq_index, num_seqs, group) -> Correction:
    return Correction(weight=torch.ones_like(log_rho), keep=mask.clone())


@ROLLOUT_CORRECTIONS.register("tis")
def _tis(cfg: MismatchConfig, log_rho, mask, seq_index, num_seqs, group) -> Correction:
    return Correction(weight=log_rho.exp().clamp(max=cfg.tis_cap), keep=mask.clone())


@ROLLOUT_CORRECTIONS.register("icepop")
def _icepop(cfg: MismatchConfig, log_rho, mask, seq_index, num_seqs, group) -> Correction:
    rho = log_rho.exp()
    inside = (rho >= cfg.low) & (rho <= cfg.high)
    return Correction(weight=inside.to(log_rho.dtype), keep=mask.clone())


@ROLLOUT_CORRECTIONS.register("seq-mask-tis")
def _seq_mask_tis(cfg: MismatchConfig, log_rho, mask, seq_index, num_seqs, group) -> Correction:
    m = mask.to(torch.float64)
    sums = torch.zeros(2, num_seqs, dtype=torch.float64, device=log_rho.device)
    sums[0].index_add_(0, seq_index, log_rho * m)
    sums[1].index_add_(0, seq_index, m)
    all_reduce(sums, group)  # a response's tokens may sit on several ranks
    mean_log = sums[0] / sums[1].clamp(min=1)  # log of the geometric-mean ratio
    inside = (mean_log >= math.log(cfg.low)) & (mean_log <= math.log(cfg.high))
    return Correction(weight=log_rho.exp().clamp(max=cfg.tis_cap), keep=mask & inside[seq_index])


def rollout_correction(mode: str, cfg: MismatchConfig, logp_old: torch.Tensor,
                       logp_rollout: torch.Tensor | None, mask: torch.Tensor, seq_index: torch.Tensor,
                       num_seqs: int, group: Any = None) -> Correction:
    """The correction of ``mode`` for the local tokens. ``mask``: the responses' tokens the sequence
    statistics run over; ``seq_index`` numbers responses 0..num_seqs−1 identically on every rank of
    ``group`` (the ranks sharing the responses' tokens)."""
    if logp_rollout is None:
        raise ValueError(f"algo.rollout_correction={mode!r} needs the rollout engine's log-probs of the "
                         "sampled tokens (batch field 'logp_rollout'), but the batch has none; use an engine "
                         "that returns them, or algo.rollout_correction=none")
    log_rho = rollout_ratio_log(logp_old, logp_rollout)
    return ROLLOUT_CORRECTIONS.get(mode)(cfg, log_rho, mask.bool(), seq_index, num_seqs, group)


def mismatch_metrics(mode: str, cfg: MismatchConfig, logp_old: torch.Tensor, logp_rollout: torch.Tensor,
                     mask: torch.Tensor, seq_index: torch.Tensor, num_seqs: int,
                     group: Any = None) -> dict[str, float]:
    """Mismatch of a rollout batch over the tokens of ``mask`` on every rank of ``group`` (each token
    on one rank): the k3 estimate of KL(π_rollout ‖ π_old) = mean(ρ − 1 − log ρ), the fraction of
    tokens whose loss the correction removes, the fraction whose TIS weight hits the cap, and the
    nearest-rank percentiles p1 / p50 / p99 of ρ (exact: a distributed k-th value search)."""
    mask = mask.bool()
    log_rho = rollout_ratio_log(logp_old, logp_rollout)
    corr = ROLLOUT_CORRECTIONS.get(mode)(cfg, log_rho, mask, seq_index, num_seqs, group)
    lr = log_rho[mask]
    capped = corr.keep & mask & (log_rho.exp() > cfg.tis_cap) if mode in ("tis", "seq-mask-tis") else None
    totals = torch.stack([mask.sum().double(), (lr.exp() - 1.0 - lr).sum(),
                          corr.masked(mask).sum().double(),
                          capped.sum().double() if capped is not None else lr.new_zeros(())])
    all_reduce(totals, group)
    n = float(totals[0])
    if n == 0:
        return {}
    out = {"mismatch/k3_kl": float(totals[1]) / n, "mismatch/masked_frac": float(totals[2]) / n}
    if capped is not None:
        out["mismatch/capped_frac"] = float(totals[3]) / n
    rho = lr.exp()
    for q, name in ((0.01, "p1"), (0.5, "p50"), (0.99, "p99")):
        k = max(1, math.ceil(q * n))  # nearest rank: the k-th smallest = the (n − k + 1)-th largest
        out[f"mismatch/ratio_{name}"] = kth_largest([rho], int(n) - k + 1, group, device=rho.device)
    return out
