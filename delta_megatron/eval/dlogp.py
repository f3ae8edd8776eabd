"""Δlog p between a base and an RL model, token by token (Beyond Magnitude, baselines.md §9.1).

For responses sampled from either model, one teacher-forced forward of each model gives, per response
token y_t: Δlog p = log π_RL(y_t) − log π_Base(y_t) (signed: which way RL moved this choice), the two
models' full-vocabulary entropies and KL(π_RL ‖ π_Base) (magnitudes: how much the distribution
moved, not which way). All at temperature 1 on the raw logits. The summaries here — most-moved
tokens, thresholds that select a given share of tokens, correlations (e.g. with DelTA's
λ̄) — are what ``delta-megatron analyze dlogp`` reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from delta_megatron.rollout.extrapolation import token_entropy, token_kl

__all__ = ["TokenTable", "score_responses", "most_moved_tokens", "thresholds_for_rates", "correlation",
           "CurvePoint", "STATISTICS"]

# statistic -> (TokenTable field, which tail a selection takes: "low" = values <= threshold)
STATISTICS = {"dlogp": ("delta", "low"), "kl": ("kl", "high"), "entropy": ("entropy_base", "high")}


@dataclass
class TokenTable:
    """Per-token statistics of a set of responses (flat over their tokens, response order)."""

    seq: torch.Tensor  # [N] response index
    position: torch.Tensor  # [N] position in the response
    token_ids: torch.Tensor  # [N]
    logp_base: torch.Tensor  # [N] log π_Base(y_t)
    logp_rl: torch.Tensor  # [N] log π_RL(y_t)
    entropy_base: torch.Tensor  # [N]
    entropy_rl: torch.Tensor  # [N]
    kl: torch.Tensor  # [N] KL(π_RL ‖ π_Base)
    reward: torch.Tensor | None = None  # [N] reward of the token's response, when known

    @property
    def delta(self) -> torch.Tensor:
        return self.logp_rl - self.logp_base

    def __len__(self) -> int:
        return int(self.token_ids.numel())

    def entropy_of(self, source: str) -> torch.Tensor:
        """Entropy of the model that sampled the responses (``base`` or ``rl``)."""
        return self.entropy_base if source == "base" else self.entropy_rl


@torch.no_grad()
def score_responses(base: torch.nn.Module, rl: torch.nn.Module, prompts: Sequence[Sequence[int]],
                    responses: Sequence[Sequence[int]], pad_token_id: int = 0,
                    batch_size: int = 64) -> TokenTable:
    """One teacher-forced forward of each model per micro-batch (right padding, causal attention: the
    padding never reaches a real token) -> :class:`TokenTable` of every response token."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    cols: dict[str, list[torch.Tensor]] = {k: [] for k in ("seq", "position", "token_ids", "logp_base", "logp_rl",
                                                          "entropy_base", "entropy_rl", "kl")}
    device = next(base.parameters()).device
    for start in range(0, len(prompts), batch_size):
        rows = [(list(p), list(r)) for p, r in zip(prompts[start:start + batch_size],
                                                   responses[start:start + batch_size])]
        width = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        att = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (p, r) in enumerate(rows):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
            att[i, :len(p) + len(r)] = 1
        ids, att = ids.to(device), att.to(device)
        lb = torch.log_softmax(base(input_ids=ids, attention_mask=att).logits.float(), dim=-1)
        lr = torch.log_softmax(rl(input_ids=ids, attention_mask=att).logits.float(), dim=-1)
        for i, (p, r) in enumerate(rows):
            if not r:
                continue
            at = torch.arange(len(p) - 1, len(p) + len(r) - 1, device=device)  # logits that predict r
            tok = ids[i, len(p):len(p) + len(r)]
            b, q = lb[i, at], lr[i, at]
            cols["seq"].append(torch.full((len(r),), start + i, dtype=torch.long))
            cols["position"].append(torch.arange(len(r)))
            cols["token_ids"].append(tok.cpu())
            cols["logp_base"].append(b.gather(-1, tok[:, None]).squeeze(1).cpu())
            cols["logp_rl"].append(q.gather(-1, tok[:, None]).squeeze(1).cpu())
            cols["entropy_base"].append(token_entropy(b).cpu())
            cols["entropy_rl"].append(token_entropy(q).cpu())
            cols["kl"].append(token_kl(q, b).cpu())
    empty = {"seq": torch.long, "position": torch.long, "token_ids": torch.long}
    return TokenTable(**{k: torch.cat(v) if v else torch.zeros(0, dtype=empty.get(k, torch.float32))
                         for k, v in cols.items()})


@dataclass
class MovedToken:
    text: str
    count: int
    mean_delta: float


def most_moved_tokens(table: TokenTable, decode: Callable[[int], str], top: int = 10,
                      min_count: int = 3) -> tuple[list[MovedToken], list[MovedToken]]:
    """(most increased, most decreased) vocabulary entries by mean Δlog p over their occurrences
    (entries seen fewer than ``min_count`` times are left out: one lucky sample is not a trend)."""
    if not len(table):
        return [], []
    ids, inverse = torch.unique(table.token_ids, return_inverse=True)
    counts = torch.bincount(inverse, minlength=len(ids))
    sums = torch.zeros(len(ids), dtype=torch.float64).index_add_(0, inverse, table.delta.double())
    means = sums / counts.clamp(min=1)
    keep = (counts >= min_count).nonzero().flatten()
    order = keep[torch.argsort(means[keep], descending=True)]
    rows = [MovedToken(decode(int(ids[j])), int(counts[j]), float(means[j])) for j in order.tolist()]
    up = [r for r in rows if r.mean_delta > 0][:top]
    down = [r for r in reversed(rows) if r.mean_delta < 0][:top]
    return up, down


def thresholds_for_rates(values: torch.Tensor, rates: Sequence[float], tail: str) -> list[float]:
    """Thresholds that select about ``rate`` of ``values``: the ``rate`` quantile for the low tail
    (select values <= t), the ``1 − rate`` quantile for the high tail (select values >= t)."""
    if values.numel() == 0:
        raise ValueError("no tokens to calibrate selection thresholds on")
    v = values.double()
    qs = torch.tensor([r if tail == "low" else 1.0 - r for r in rates], dtype=torch.float64)
    return torch.quantile(v, qs.clamp(0.0, 1.0)).tolist()


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 with ties given their average rank (for Spearman's ρ)."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, inverse, ranks)
    return (sums / counts)[inverse]


def correlation(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Pearson's r and Spearman's ρ of two equally long vectors (nan when either is constant)."""
    if x.numel() != y.numel():
        raise ValueError(f"correlation of {x.numel()} and {y.numel()} values")

    def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
        den = (a.square().sum() * b.square().sum()).sqrt()
        return float((a * b).sum() / den) if den > 0 else float("nan")

    return {"pearson": pearson(x, y), "spearman": pearson(_ranks(x.double()), _ranks(y.double())),
            "n": int(x.numel())}


@dataclass
class CurvePoint:
    """One decoding of the replacement curve: base samples, ``criterion`` picks positions that are
    resampled from π_RL (weights (0, 1))."""

    criterion: str
    threshold: float | None
    target_rate: float
    replaced: float  # measured fraction of resampled tokens
    metrics: dict[str, float] = field(default_factory=dict)  # avg@k, pass@k (fractions)
