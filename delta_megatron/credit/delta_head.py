"""DelTA inside the output layer: the ``HeadObserver`` the actor drives in its old-log-prob pass.

For each micro-batch on the last pipeline stage the observer feeds the DelTA engine the LM-head
input ``h`` and ``log p(y_t)`` (output-row proxy, §2.1) — or forms the top-K hidden-gradient proxy
v̂ from this tensor-parallel rank's vocabulary rows and sums it over TP (§2.2 / §9.5) — with each
token's advantage. The engine reduces over the scope's process group (DP×CP, ×TP when ``h`` is the
sequence-parallel shard) and asks for further passes in ``moments`` / ``recompute`` modes.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
import torch.distributed as dist

from delta_megatron.credit.delta_stats import scope_group, topk_hidden_proxy
from delta_megatron.credit_contract import HeadView

__all__ = ["DeltaHeadObserver"]


class DeltaHeadObserver:
    """One rollout batch of DelTA in the actor; ``credit`` is the ``DeltaCredit`` (config, state)."""

    field = "credit_delta"

    def __init__(self, credit: Any):
        self.credit = credit
        self.engine = None
        self._advantages: torch.Tensor | None = None
        self._global: torch.Tensor | None = None

    def begin(self, batch: Any, *, hidden_size: int, groups: Any, sequence_sharded: bool,
              device: torch.device) -> None:
        group = scope_group(self.credit.cfg.scope, h_sequence_sharded=sequence_sharded)
        self.engine = self.credit.engine(hidden_size, group, device=device)
        self._advantages = batch["advantage_tokens"]
        # random controls key on the token's place in the whole step batch, also on a DP shard
        self._global = batch["global_token_index"] if "global_token_index" in batch else None

    def observe(self, view: HeadView) -> None:
        idx = view.token_index[view.rows]  # [n] batch token of each of this rank's rows
        adv = torch.zeros(idx.shape[0])
        adv[idx >= 0] = self._advantages[idx[idx >= 0]].float()
        ids = idx if self._global is None else torch.where(idx >= 0, self._global[idx.clamp(min=0)], idx)
        common = dict(adv=adv.to(view.hidden.device), mask=view.response[view.rows],
                      token_ids=ids)  # random controls draw from token ids: layout-invariant
        if self.credit.cfg.proxy == "topk_hidden":
            self.engine.observe(view.pass_index, view.key, v=self._topk_proxy(view)[view.rows].float(), **common)
        else:
            self.engine.observe(view.pass_index, view.key, h=view.hidden.float(),
                                logp=view.logp[view.rows].float(), **common)

    @staticmethod
    def _topk_proxy(view: HeadView) -> torch.Tensor:
        """v̂ [S, d] for the whole packed row: each TP rank adds the terms of the vocabulary rows it
        owns (K gathers of [S, d], never [S, K, d]), one all-reduce of the d-vectors over TP."""
        v = topk_hidden_proxy(view.lm_head_weight, view.targets, view.topk_ids, view.topk_logits,
                              vocab_start=view.vocab_start)
        if view.groups.tp_size > 1:
            dist.all_reduce(v, group=view.groups.tp)
        return v

    def end_pass(self, p: int) -> bool:
        self.engine.end_pass(p)
        return not self.engine.finished

    def values(self, key: Hashable) -> torch.Tensor:
        return self.engine.values(key)

    def metrics(self) -> dict[str, float]:
        return {f"credit/{k}": float(v) for k, v in self.engine.metrics.items()}
