"""The credit stage of a training step: the configured methods composed by their declared target.

Order (baselines.md §12, ``TARGET_ORDER``): additive advantage transforms (KTAE) first, since they can
flip a token's sign; then multiplicative advantage modifiers (low-probability re-weighting); then
per-token loss weights (DelTA λ̄, counterfactual w, multiplied) and loss masks (DelTA token
selection); per-micro-batch selectors (Forking Tokens) run in the train pass on the current
entropies. Methods of the same target keep their order in ``credit.methods``.

The pipeline reads each method's declarations (``needs``, ``target``, ``per_microbatch``): the union of
the needs is the actor's ``Capture``; a method that needs ``hidden`` contributes a ``HeadObserver``,
whose values the old-log-prob pass leaves in the batch; a method that needs ``extra_forward`` gets
``score_fn``. The trainer loop stays free of ``if method == ...``.
"""

from __future__ import annotations

from typing import Any

import torch

from delta_megatron.batch import RolloutBatch
from delta_megatron.credit.base import (
    TARGET_ORDER,
    CreditContext,
    CreditInputs,
    CreditOutput,
    ScoreFn,
    build_method,
)
from delta_megatron.credit.config import CreditConfig
from delta_megatron.credit_contract import Capture, LossPlan


class CreditPipeline:
    def __init__(self, cfg: CreditConfig, context: CreditContext | None = None):
        self.cfg = cfg
        self.context = context or CreditContext()
        self.methods = {name: build_method(name, getattr(cfg, name), context) for name in cfg.methods}
        per_batch = [n for n, m in self.methods.items() if not m.per_microbatch]
        self.order = sorted(per_batch, key=lambda n: TARGET_ORDER.index(self.methods[n].target))
        self.selectors = [m for m in self.methods.values() if m.per_microbatch]
        self._observers: dict[str, Any] = {}

    def capture(self, entropy: bool = False) -> Capture:
        """What the old-log-prob pass must record: the union of the methods' needs, with fresh
        observers for the methods that read the LM head (``entropy``: wanted by the caller too)."""
        self._observers = {n: m.observer() for n, m in self.methods.items() if m.needs.hidden}
        return Capture.union([m.needs for m in self.methods.values()], self._observers.values(), entropy=entropy)

    def assign(self, batch: RolloutBatch, score_fn: ScoreFn | None = None) -> tuple[LossPlan, dict[str, float]]:
        """Adds ``advantage_final`` (and ``credit_weight`` / ``credit_mask``) token fields; returns the
        actor's LossPlan and metrics. ``score_fn`` runs no-grad forwards (counterfactual spans)."""
        metrics: dict[str, float] = {}
        resp = batch.response_mask
        adv = batch["advantage_tokens"].clone().float()
        weight = mask = None
        for name in self.order:
            method = self.methods[name]
            out = self._output(name, method, batch, adv, score_fn)
            metrics.update(_prefixed(name, out.metrics))
            if out.target == "advantage_add":
                adv[resp] += out.values.float()
            elif out.target == "advantage_scale":
                adv[resp] *= out.values.float()
            elif out.target == "loss_weight":
                weight = torch.ones(batch.num_tokens) if weight is None else weight
                weight[resp] *= out.values.float()
            else:  # loss_mask
                mask = torch.ones(batch.num_tokens, dtype=torch.bool) if mask is None else mask
                mask[resp] &= out.values.bool()
        batch.add_token_field("advantage_final", adv, overwrite=True)
        if weight is not None:
            batch.add_token_field("credit_weight", weight, overwrite=True)
        if mask is not None:
            batch.add_token_field("credit_mask", mask, overwrite=True)
        plan = LossPlan(advantage_field="advantage_final",
                        weight_field="credit_weight" if weight is not None else None,
                        mask_field="credit_mask" if mask is not None else None,
                        selector=self.selectors[0] if self.selectors else None)
        return plan, metrics

    def _output(self, name: str, method: Any, batch: RolloutBatch, adv: torch.Tensor,
                score_fn: ScoreFn | None) -> CreditOutput:
        resp = batch.response_mask
        if name in self._observers:  # computed inside the old-log-prob pass
            return CreditOutput(method.target, batch[self._observers[name].field][resp])
        inputs = self._inputs(batch, adv, method.needs)
        if method.needs.extra_forward:
            if score_fn is None:
                raise ValueError(f"credit method {name!r} needs scoring forwards: pass score_fn")
            inputs.extra["score_fn"] = score_fn
            inputs.extra["prompt_ids"] = [batch.tokens[int(s):int(s) + int(p)] for s, p in
                                          zip(batch.cu_seqlens[:-1], batch.prompt_lens)]
        return method.assign(inputs, self.context.token_group)

    @staticmethod
    def _inputs(batch: RolloutBatch, adv: torch.Tensor, needs: Any) -> CreditInputs:
        """Flat response-token view of the batch (every rank holds the whole batch; its per-token
        log-probs and entropies only on the tokens it ``owned`` in the old-log-prob pass)."""
        resp = batch.response_mask
        return CreditInputs(
            advantages=adv[resp], mask=torch.ones(int(resp.sum()), dtype=torch.bool),
            seq_index=batch.seq_index[resp], token_ids=batch.tokens[resp],
            logp=batch["logp_old"][resp] if needs.logp and "logp_old" in batch else None,
            entropy=batch["entropy"][resp] if needs.entropy and "entropy" in batch else None,
            rewards=batch["reward"].float(), group_index=batch["group_id"],
            owned=batch["owned"][resp] if "owned" in batch else None)

    def state_dict(self) -> dict[str, Any]:
        return {n: m.state_dict() for n, m in self.methods.items() if hasattr(m, "state_dict")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for n, m in self.methods.items():
            if n in state and hasattr(m, "load_state_dict"):
                m.load_state_dict(state[n])


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {(k if "/" in k else f"{prefix}/{k}"): v for k, v in metrics.items()}
