"""FIPO (baselines.md §6): advantages scaled by the clipped exp of the discounted future log-ratio.

Δ_k = clamped log-ratio (detached); M_k = 1[Δ_k ≤ ln c]; γ = 2^{−1/τ_d};
FutureKL_t = Σ_{k≥t} M_k γ^{k−t} Δ_k (current token included); f_t = clip(exp(FutureKL_t), f_lo, f_hi);
safety: if A_t < 0 and r_t > safety_thresh, f_t ← clip(f_t, 0.8, 1.0); Ã_t = A_t·f_t feeds PPO-clip with
the dual clip keyed on Ã < 0. A response with more than one dual-clipped negative token is dropped from
the loss. ``normalizer: kept`` (the reference) drops it from the token-mean's denominator too, which
therefore depends on the current policy and is known only after the forward passes: the loss flags the
dropped tokens (``TokenLoss.dropped``) and the mini-batch is rescaled once they are counted over all
micro-batches and ranks (``aggregation.kept_scale``). ``all`` keeps them in the denominator (the loss
is smaller by kept/total when the filter hits).

The suffix sum runs as a chunked triangular matmul over a [sequences, max_len] view (chunk 128, as
the reference), carrying the sum across chunks, so γ^k never underflows for long responses.

Under context parallelism a rank holds two chunks of each response, so the suffix sum needs the other
ranks' tokens: the detached Δ (one scalar per token) of the micro-batch is summed into a dense buffer
over the CP group, keyed by each token's global index, and every rank runs the same suffix sum over
whole responses (the sequence filter's per-response counts are summed over CP likewise). Only
scalars travel, never logits; the result equals CP = 1 exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from delta_megatron.algo.loss_api import POLICY_LOSSES, PolicyLossInputs, TokenLoss
from delta_megatron.algo.ppo_clip import log_ratio, ppo_clip_from_ratio
from delta_megatron.utils.configs import Section, fail, option


@dataclass
class FIPOConfig(Section):
    decay_rate: float = option(32.0, "τ_d: half-life of the future-KL discount, in tokens", gt=0)
    f_range: tuple[float, float] = option((1.0, 1.2), "clip [f_lo, f_hi] of the future-KL factor", gt=0)
    safety_thresh: float = option(10.0, "ratio above which a negative-advantage token's factor is "
                                        "clipped to [0.8, 1]", gt=0)
    chunk: int = option(128, "tokens per block of the suffix-sum matmul", ge=1)
    seq_filter: bool = option(True, "drop responses with more than one dual-clipped negative token")
    normalizer: Literal["kept", "all"] = option(
        "kept", "token-mean denominator: tokens the sequence filter keeps (reference) or all tokens")

    def validate(self) -> None:
        lo, hi = self.f_range
        if not 0 < lo <= 1 <= hi:
            fail("f_range", self.f_range, "need 0 < lower <= 1 <= upper")


def positions_in_sequence(seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Position of each token inside its sequence; tokens of a sequence are contiguous and ordered."""
    n = seq_index.numel()
    arange = torch.arange(n, device=seq_index.device)
    first = torch.full((num_seqs,), n, dtype=torch.long, device=seq_index.device)
    first = first.scatter_reduce(0, seq_index, arange, "amin")
    return arange - first[seq_index]


def future_kl(delta: torch.Tensor, seq_index: torch.Tensor, num_seqs: int, gamma: float,
              chunk: int = 128) -> torch.Tensor:
    """FutureKL_t = Σ_{k≥t} γ^{k−t} δ_k within each sequence. ``delta``: [tokens] (already masked)."""
    pos = positions_in_sequence(seq_index, num_seqs)
    length = int(pos.max()) + 1 if pos.numel() else 0
    grid = torch.zeros(num_seqs, length, dtype=torch.float64, device=delta.device)  # [S, L]
    grid[seq_index, pos] = delta.double()
    out = torch.zeros_like(grid)
    carry = torch.zeros(num_seqs, dtype=torch.float64, device=delta.device)
    for start in reversed(range(0, length, chunk)):
        width = min(chunk, length - start)
        idx = torch.arange(width, dtype=torch.float64, device=delta.device)
        gap = idx[None, :] - idx[:, None]  # [t, k] = k − t
        tri = torch.where(gap >= 0, gamma ** gap.clamp(min=0), torch.zeros_like(gap))
        block = grid[:, start:start + width] @ tri.T  # [S, width]
        block = block + carry[:, None] * gamma ** (width - idx)[None, :]
        out[:, start:start + width] = block
        carry = block[:, 0]
    return out[seq_index, pos].to(delta.dtype)


def future_kl_cp(delta: torch.Tensor, seq_index: torch.Tensor, num_seqs: int, gamma: float,
                 chunk: int, token_index: torch.Tensor, group) -> torch.Tensor:
    """``future_kl`` when each CP rank holds only some tokens of each response: the tokens are put in
    global order through ``token_index`` (unique over the group, ascending within a response) and
    the whole responses' suffix sums computed on every rank; returns the local tokens' values."""
    dev = delta.device
    bounds = torch.tensor([-int(token_index.min()) if token_index.numel() else -(2**62),
                           int(token_index.max()) if token_index.numel() else -(2**62)], device=dev)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=group)
    lo, hi = -int(bounds[0]), int(bounds[1])
    if hi < lo:  # no rank holds a token
        return torch.zeros_like(delta)
    buf = torch.zeros(3, hi - lo + 1, dtype=torch.float64, device=dev)  # present, Δ, sequence
    at = token_index.to(dev) - lo
    buf[0, at], buf[1, at], buf[2, at] = 1.0, delta.double(), seq_index.double()
    dist.all_reduce(buf, group=group)
    present = buf[0] > 0
    whole = future_kl(buf[1, present], buf[2, present].long(), num_seqs, gamma, chunk)
    slot = torch.cumsum(present.long(), 0) - 1  # dense position -> place among present tokens
    return whole[slot[at]].to(delta.dtype)


def fipo_weights(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
                 mask: torch.Tensor, seq_index: torch.Tensor, num_seqs: int, cfg: FIPOConfig,
                 dual_clip_c: float, cp_group=None, token_index: torch.Tensor | None = None) -> torch.Tensor:
    """Detached per-token factor f_t."""
    delta = log_ratio(logp, logp_old).detach()
    keep = (delta <= math.log(dual_clip_c)) & mask
    gamma = 2.0 ** (-1.0 / cfg.decay_rate)
    masked = torch.where(keep, delta, torch.zeros_like(delta))
    if cp_group is not None and dist.get_world_size(cp_group) > 1:
        fkl = future_kl_cp(masked, seq_index, num_seqs, gamma, cfg.chunk, token_index, cp_group)
    else:
        fkl = future_kl(masked, seq_index, num_seqs, gamma, cfg.chunk)
    f = torch.clamp(torch.exp(fkl), cfg.f_range[0], cfg.f_range[1])
    unsafe = (advantages < 0) & (torch.exp(delta) > cfg.safety_thresh)
    return torch.where(unsafe, torch.clamp(f, 0.8, 1.0), f)


def fipo_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, seq_index: torch.Tensor, num_seqs: int, cfg: FIPOConfig,
              clip_low: float = 0.2, clip_high: float = 0.28, dual_clip_c: float = 10.0,
              cp_group=None, token_index: torch.Tensor | None = None) -> tuple[TokenLoss, torch.Tensor]:
    """Returns the token loss and the per-token keep mask of the sequence filter."""
    f = fipo_weights(logp, logp_old, advantages, mask, seq_index, num_seqs, cfg, dual_clip_c,
                     cp_group, token_index)
    ratio = torch.exp(log_ratio(logp, logp_old))
    out = ppo_clip_from_ratio(ratio, advantages * f, clip_low, clip_high, dual_clip_c)
    keep = mask
    if cfg.seq_filter:
        hits = torch.zeros(num_seqs, dtype=torch.long, device=mask.device)
        hits = hits.index_add_(0, seq_index, (out.dual_clipped & mask).long())
        if cp_group is not None and dist.get_world_size(cp_group) > 1:
            dist.all_reduce(hits, group=cp_group)  # a response's hits may sit on several CP ranks
        keep = mask & (hits[seq_index] <= 1)
        if cfg.normalizer == "kept":
            out.dropped = mask & ~keep
    return out, keep


@POLICY_LOSSES.register("fipo")
def _fipo(cfg, inp: PolicyLossInputs) -> tuple[TokenLoss, torch.Tensor]:
    if inp.cp_group is not None and inp.token_index is None:
        raise ValueError("FIPO under context parallelism needs PolicyLossInputs.token_index "
                         "(the future-KL suffix sum crosses CP chunks)")
    return fipo_loss(inp.logp, inp.logp_old, inp.advantages, inp.mask, inp.seq_index, inp.num_seqs, cfg.fipo,
                     cfg.clip_low, cfg.clip_high, cfg.dual_clip_c, cp_group=inp.cp_group,
                     token_index=inp.token_index)
