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

CreditTarget = Literal["advantage_add", "advantage_scale", "loss_weight", "loss_mask"]


@dataclass(frozen=True)
class CreditNeeds:
    """What the actor must capture in the old-log-prob pass for this method."""

    hidden: bool = False  # LM-head input h_t (post final norm)           [tokens, d]
    logp: bool = False  # old-policy log p(y_t)                            [tokens]
    entropy: bool = False  # full-vocabulary entropy at the position of y_t [tokens]
    current_entropy: bool = False  # entropy of the *training* forward (Forking Tokens)
    extra_forward: bool = False  # needs no-grad re-scoring forwards (counterfactual spans)
    topk: int = 0  # top-k logits/ids per token (hidden-gradient proxy)


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
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CreditOutput:
    """Per-token values for the local tokens, applied at ``target``."""

    target: CreditTarget
    values: torch.Tensor  # [tokens] fp32 (bool for loss_mask)
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class TokenCredit(Protocol):
    """A credit method. ``assign`` is called once per rollout batch (after advantages) unless the
    method is per-micro-batch (``per_microbatch``), in which case the actor calls it in the train
    forward with the current entropies."""

    needs: CreditNeeds
    target: CreditTarget
    per_microbatch: bool

    def assign(self, inputs: CreditInputs, group: Any = None) -> CreditOutput: ...


# A callback for methods that need extra no-grad forwards: given full (prompt + response) token-id
# sequences and boolean ``score_mask``s over the same positions, return per sequence the sum of
# log p(y_t | y_<t) over the *target* positions t marked in its mask.
ScoreFn = Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]
