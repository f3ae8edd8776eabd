"""The credit stage of a training step: configured methods composed in baselines.md §12 order.

1. additive advantage transforms (KTAE) — before anything else, since they can flip a token's sign;
2. multiplicative advantage modifiers (low-probability re-weighting);
3. per-token loss weights (DelTA λ̄, counterfactual w) and loss masks (DelTA token selection);
4. per-micro-batch masks from the current forward (Forking Tokens), applied by the actor.

DelTA needs the LM-head input ``h``, so the actor runs its engine inside the old-log-prob pass
(:meth:`capture`); this stage then only combines what is already in the batch. The trainer loop
stays free of ``if method == ...``: it asks for a capture, runs the pass, and hands the resulting
:class:`~delta_megatron.actor.megatron_actor.LossPlan` to the train pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from delta_megatron.batch import RolloutBatch
from delta_megatron.credit.base import CreditInputs
from delta_megatron.credit.config import CreditConfig
from delta_megatron.credit.counterfactual import CounterfactualCredit
from delta_megatron.credit.delta import DeltaCredit
from delta_megatron.credit.forking import ForkingCredit, top_entropy_mask
from delta_megatron.credit.ktae import KTAECredit
from delta_megatron.credit.lowprob import LowProbCredit


class CreditPipeline:
    def __init__(self, cfg: CreditConfig, decode: Callable[[list[int]], list[str]] | None = None):
        self.cfg = cfg
        names = set(cfg.methods)
        self.delta = DeltaCredit(cfg.delta) if "delta" in names else None
        self.ktae = KTAECredit(cfg.ktae) if "ktae" in names else None
        self.lowprob = LowProbCredit(cfg.lowprob) if "lowprob" in names else None
        self.forking = ForkingCredit(cfg.forking) if "forking" in names else None
        self.counterfactual = CounterfactualCredit(cfg.counterfactual, decode=decode) \
            if "counterfactual" in names else None

    def capture(self):
        """What the old-log-prob pass must record."""
        from delta_megatron.actor.megatron_actor import Capture

        return Capture(entropy=True, delta=self.delta)

    def assign(self, batch: RolloutBatch, score_fn: Any = None) -> tuple[Any, dict[str, float]]:
        """Adds ``advantage_final`` (and ``credit_weight`` / ``credit_mask``) token fields; returns the
        actor's LossPlan and metrics. ``score_fn`` runs no-grad forwards (counterfactual spans)."""
        from delta_megatron.actor.megatron_actor import LossPlan

        metrics: dict[str, float] = {}
        resp = batch.response_mask
        adv = batch["advantage_tokens"].clone().float()
        inputs = self._inputs(batch, adv)
        if self.ktae is not None:
            out = self.ktae.assign(inputs)
            adv[resp] += out.values.float()
            metrics.update(_prefixed("ktae", out.metrics))
        if self.lowprob is not None:
            out = self.lowprob.assign(self._inputs(batch, adv))
            adv[resp] *= out.values.float()
            metrics.update(_prefixed("lowprob", out.metrics))
        batch.add_token_field("advantage_final", adv, overwrite=True)

        weight = None
        mask_field = None
        if self.delta is not None:
            if self.delta.target == "loss_mask":
                batch.add_token_field("credit_mask", batch["credit_delta"] > 0, overwrite=True)
                mask_field = "credit_mask"
            else:
                weight = batch["credit_delta"].clone()
        if self.counterfactual is not None:
            cf_inputs = self._inputs(batch, adv)
            cf_inputs.extra["score_fn"] = score_fn
            cf_inputs.extra["prompt_ids"] = [batch.tokens[int(s):int(s) + int(p)] for s, p in
                                             zip(batch.cu_seqlens[:-1], batch.prompt_lens)]
            out = self.counterfactual.assign(cf_inputs)
            cf = torch.ones(batch.num_tokens)
            cf[resp] = out.values.float()
            weight = cf if weight is None else weight * cf
            metrics.update(_prefixed("counterfactual", out.metrics))
        if weight is not None:
            batch.add_token_field("credit_weight", weight, overwrite=True)

        plan = LossPlan(advantage_field="advantage_final",
                        weight_field="credit_weight" if weight is not None else None,
                        mask_field=mask_field)
        if self.forking is not None:
            rho = self.forking.cfg.rho
            plan.microbatch_mask = lambda entropy, mask, group=None: \
                top_entropy_mask(entropy, mask, rho, group)[0] & mask
            plan.microbatch_count = self.forking.normaliser
        return plan, metrics

    @staticmethod
    def _inputs(batch: RolloutBatch, adv: torch.Tensor) -> CreditInputs:
        """Flat response-token view of the batch (every rank holds the whole batch)."""
        resp = batch.response_mask
        logp = batch["logp_old"][resp] if "logp_old" in batch else None
        return CreditInputs(
            advantages=adv[resp], mask=torch.ones(int(resp.sum()), dtype=torch.bool),
            seq_index=batch.seq_index[resp], token_ids=batch.tokens[resp], logp=logp,
            entropy=batch["entropy"][resp] if "entropy" in batch else None,
            rewards=batch["reward"].float(), group_index=batch["group_id"])

    def state_dict(self) -> dict[str, Any]:
        return {"delta": self.delta.state_dict()} if self.delta is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.delta is not None and "delta" in state:
            self.delta.load_state_dict(state["delta"])


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {(k if "/" in k else f"{prefix}/{k}"): v for k, v in metrics.items()}
