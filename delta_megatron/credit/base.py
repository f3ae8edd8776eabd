"""The TokenCredit protocol: what a credit method needs, and where its output applies.

Every method (DelTA, KTAE, low-probability re-weighting, Forking Tokens, counterfactual spans) reads
flat per-token tensors of the *local* tokens (``CreditInputs``) and returns per-token values with a
declared target (``CreditOutput``). The actor supplies only what ``needs`` asks for, so a method that
needs no hidden states costs nothing extra. Composition order follows baselines.md §12: additive
advantage transforms (KTAE) first, then multiplicative advantage modifiers (low-prob), then loss
weights (DelTA λ̄, counterfactual w) and loss masks (forking).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from delta_megatron.credit_contract import CreditNeeds
from delta_megatron.utils.registry import Registry

__all__ = ["CREDIT_METHODS", "CreditContext", "CreditInputs", "CreditNeeds", "CreditOutput", "CreditTarget",
           "ScoreFn", "TARGET_ORDER", "TokenCredit", "build_method"]

CreditTarget = Literal["advantage_add", "advantage_scale", "loss_weight", "loss_mask"]
TARGET_ORDER: tuple[str, ...] = ("advantage_add", "advantage_scale", "loss_weight", "loss_mask")  # §12

CREDIT_METHODS: Registry = Registry("credit method")
"""``@CREDIT_METHODS.register("name")`` above a TokenCredit class; ``credit.<name>`` is its config."""


@dataclass
class CreditInputs:
    """Flat per-token view of the local tokens of a rollout batch (only valid response tokens matter).

    ``seq_index`` identifies the response each token belongs to (a global id, stable across DP/CP
    shards); ``group_index`` is the prompt group of that response. Per-sample tensors are indexed by
    ``seq_index``.
    """

    advantages: torch.Tensor  # [tokens] fp32, A_i broadcast to the tokens of response i
    mask: torch.Tensor  # [tokens] bool, valid response tokens
    seq_index: torch.Tensor  # [tokens] long
    token_ids: torch.Tensor | None = None  # [tokens] long, the sampled token y_t
    logp: torch.Tensor | None = None  # [tokens] fp32, old log p(y_t)
    entropy: torch.Tensor | None = None  # [tokens] fp32
    hidden: torch.Tensor | None = None  # [tokens, d]
    rewards: torch.Tensor | None = None  # [num_seqs] fp32, scalar reward per response
    group_index: torch.Tensor | None = None  # [num_seqs] long, prompt group per response
    # [tokens] bool: the tokens whose logp / entropy this rank computed (its DP×CP share; the others
    # are 0 here). A method that aggregates them over tokens sums over ``CreditContext.token_group``.
    # None: every token
    owned: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CreditOutput:
    """Per-token values for the local tokens, applied at ``target``."""

    target: CreditTarget
    values: torch.Tensor  # [tokens] fp32 (bool for loss_mask)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class CreditContext:
    """What a method may use besides its own config, built once by the trainer."""

    decode: Callable[[list[int]], list[str]] | None = None  # token ids → per-token strings
    token_group: Any = None  # the ranks whose ``owned`` tokens partition the batch (DP×CP); None: one


@runtime_checkable
class TokenCredit(Protocol):
    """A credit method, read by the pipeline through its declarations:

    * ``needs`` — what the actor captures for it (``hidden``: the method returns a ``HeadObserver``
      from ``observer()``, whose field holds its values; ``extra_forward``: ``assign`` gets a
      ``score_fn`` in ``inputs.extra``);
    * ``target`` — where its values apply (composition order ``TARGET_ORDER``, baselines.md §12);
    * ``per_microbatch`` — the method is a ``MicroBatchSelector`` the train pass calls with the current
      forward's entropies (Forking Tokens) instead of a once-per-batch ``assign``.
    """

    needs: CreditNeeds
    target: CreditTarget
    per_microbatch: bool

    def assign(self, inputs: CreditInputs, group: Any = None) -> CreditOutput: ...


# A callback for methods that need extra no-grad forwards: given full (prompt + response) token-id
# sequences and boolean ``score_mask``s over the same positions, return per sequence the sum of
# log p(y_t | y_<t) over the *target* positions t marked in its mask.
ScoreFn = Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]


def build_method(name: str, cfg: Any, context: CreditContext | None = None) -> TokenCredit:
    """The registered method ``name`` with its config section (``build(cfg, context)`` when the class
    needs the context, else ``cls(cfg)``)."""
    cls = CREDIT_METHODS.get(name)
    build = getattr(cls, "build", None)
    return build(cfg, context or CreditContext()) if build is not None else cls(cfg)
