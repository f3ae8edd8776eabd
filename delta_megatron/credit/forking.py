"""Forking Tokens: train only on the top-ρ highest-entropy tokens (baselines.md §7).

"Beyond the 80/20 Rule": the few high-entropy "forking" tokens steer the reasoning path, so the
policy-gradient loss keeps only the top ρ = 20% of response tokens by entropy. The entropy is that of
the **current** policy in the training forward (not the rollout's), hence ``per_microbatch = True``:
the actor calls ``assign`` inside each train micro-batch with ``inputs.entropy`` from that forward.

Selection (reference): flatten the valid tokens of the micro-batch, k = int(n·ρ + 0.9999), keep the
top-k. Ties are broken deterministically by token order (the reference's ``torch.topk`` breaks them
arbitrarily). When a micro-batch is sharded (CP), pass the process group holding its shards as
``group``: entropies are gathered so every rank selects from the same n tokens.

One call covers one micro-batch, as in the reference. (A single threshold over the whole mini-batch,
the paper's wording, would need every micro-batch's current entropy before the first gradient forward —
one more no-grad forward of the mini-batch — and is not offered.) The normaliser of the token-mean (§7)
depends on the selection: ``selected`` (reference) divides by Σk, ``all`` by the number of valid
tokens. Since k only depends on n, the actor can compute the global normaliser before any forward with
:func:`num_selected`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from delta_megatron.credit.base import CREDIT_METHODS, CreditInputs, CreditNeeds, CreditOutput, CreditTarget
from delta_megatron.utils.configs import Section, option, validate


@dataclass
class ForkingConfig(Section):
    """§7 defaults: ρ = 0.2 per micro-batch, token-mean over the selected tokens."""

    rho: float = option(0.2, "fraction of valid tokens kept, by entropy (entropy_top_ratio)", gt=0, le=1)
    normaliser: Literal["selected", "all"] = option("selected", "token-mean over the selected tokens "
                                                                "(reference) or over all valid tokens")


def num_selected(n: int, rho: float) -> int:
    """k = int(n·ρ + 0.9999) (the reference's ceil), never more than n."""
    return min(n, int(n * rho + 0.9999))


def _gather_valid(values: torch.Tensor, group: Any) -> tuple[torch.Tensor, int]:
    """Concatenate the 1-D ``values`` of every rank of ``group`` in rank order.

    Returns (all values [n_total], offset of this rank's values in it)."""
    single = group is None or not dist.is_available() or not dist.is_initialized()
    if single or dist.get_world_size(group) == 1:
        return values, 0
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    size = torch.tensor([values.numel()], dtype=torch.long, device=values.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(counts), dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    chunks = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded, group=group)
    gathered = torch.cat([c[:m] for c, m in zip(chunks, counts)])
    return gathered, sum(counts[:rank])


def top_entropy_mask(entropy: torch.Tensor, valid: torch.Tensor, rho: float, group: Any = None
                     ) -> tuple[torch.Tensor, int, int, float]:
    """Bool mask [tokens] of the top-k valid tokens by entropy over all ranks of ``group``.

    Returns (mask, k, n, threshold) with n the number of valid tokens across the group and threshold
    the entropy of the k-th selected token (nan if none)."""
    valid = valid.bool()
    local = entropy.detach().float()[valid]  # [n_local]
    everything, offset = _gather_valid(local, group)  # [n]
    n = everything.numel()
    k = num_selected(n, rho)
    order = torch.sort(everything, descending=True, stable=True).indices  # ties: earlier token first
    chosen = torch.zeros(n, dtype=torch.bool, device=entropy.device)
    chosen[order[:k]] = True
    mask = torch.zeros_like(valid)
    mask[valid] = chosen[offset: offset + local.numel()]
    threshold = float(everything[order[k - 1]]) if k > 0 else float("nan")
    return mask, k, n, threshold


@CREDIT_METHODS.register("forking")
class ForkingCredit:
    """TokenCredit for §7: a 0/1 loss mask (target ``loss_mask``) from the current forward's entropy."""

    target: CreditTarget = "loss_mask"
    per_microbatch = True

    def __init__(self, cfg: ForkingConfig | None = None):
        self.cfg = cfg or ForkingConfig()
        validate(self.cfg, "credit.forking")
        self.needs = CreditNeeds(current_entropy=True)

    def select(self, entropy: torch.Tensor, mask: torch.Tensor, group: Any = None) -> torch.Tensor:
        """MicroBatchSelector: the top-ρ tokens of ``mask`` by the current forward's entropy."""
        return top_entropy_mask(entropy, mask, self.cfg.rho, group)[0]

    def count(self, n_valid: int) -> int:
        """MicroBatchSelector: the micro-batch's share of the loss normaliser."""
        return self.normaliser(n_valid)

    def normaliser(self, n_valid: int) -> int:
        """Token count the loss divides by for a selection scope holding ``n_valid`` valid tokens."""
        return num_selected(n_valid, self.cfg.rho) if self.cfg.normaliser == "selected" else n_valid

    def assign(self, inputs: CreditInputs, group: Any = None) -> CreditOutput:
        """``inputs.entropy``: current-policy entropy [tokens]; ``group``: ranks sharing this scope."""
        if inputs.entropy is None:
            raise ValueError("forking tokens need the current forward's entropy (needs.current_entropy)")
        mask, k, n, threshold = top_entropy_mask(inputs.entropy, inputs.mask, self.cfg.rho, group)
        metrics = {
            "forking/num_selected": float(mask.sum()),  # on this rank
            "forking/num_selected_total": float(k),  # over the group
            "forking/num_valid_total": float(n),
            "forking/normaliser": float(k if self.cfg.normaliser == "selected" else n),
            "forking/entropy_threshold": threshold,
        }
        return CreditOutput(target=self.target, values=mask, metrics=metrics)
