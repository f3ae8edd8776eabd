"""Per-token-id sums of a credit weight over one batch: the raw material of token clouds.

DelTA's λ̄ (or any per-token loss weight) says which tokens a method up- or down-weights; averaged by
token id over a run it shows *what* the method rewards (the DelTA paper's Fig. 4). One record per
logged step keeps Σ weight and counts per id, split by the sign of the token's advantage; readers
(``viz.token_credit_table``) add records up and divide, so runs of any length and resumed runs
(records are keyed by step) aggregate exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SIDES = ("pos", "neg", "zero")  # advantage > 0, < 0, == 0


def token_credit_sums(tokens: torch.Tensor, weights: torch.Tensor, advantage: torch.Tensor,
                      decode: Callable[[list[int]], list[str]] | None = None) -> dict:
    """``tokens``, ``weights``, ``advantage``: [n] over the response tokens of a batch. Returns
    ``{"ids", "text", "sum": [[pos, neg, zero] per id], "count": [[...] per id]}``."""
    ids, inverse = torch.unique(tokens, return_inverse=True)  # [u], [n]
    side = torch.where(advantage > 0, 0, torch.where(advantage < 0, 1, 2))  # [n]
    flat = inverse * len(SIDES) + side  # [n]: (id, side) cell
    sums = torch.zeros(len(ids) * len(SIDES), dtype=torch.float64).index_add_(0, flat, weights.double())
    counts = torch.zeros(len(ids) * len(SIDES), dtype=torch.long).index_add_(0, flat, torch.ones_like(flat))
    id_list = ids.tolist()
    return {"ids": id_list, "text": decode(id_list) if decode else [str(i) for i in id_list],
            "sum": sums.view(-1, len(SIDES)).tolist(), "count": counts.view(-1, len(SIDES)).tolist()}
