"""The credit ⇄ actor contract: what a token-credit method may ask of the actor, and what it gives back.

The actor is generic in the way megatron-core's schedules are (the caller brings ``forward_step_func``
and the loss; the core never knows the method). It knows only this module:

* :class:`CreditNeeds` — what a method declares it needs (hidden states, log-probs, entropy, top-K,
  the current forward's entropy, extra scoring forwards). The pipeline takes the union of the
  configured methods' needs into one :class:`Capture` for the old-log-prob pass.
* :class:`HeadObserver` — a method that must see the LM head itself (DelTA reads ``h`` and the LM-head
  weight inside the output layer) hands the actor an observer; the actor shows it one
  :class:`HeadView` per micro-batch on the last pipeline stage, runs further forward-only passes while
  it asks for them, and writes its per-token values into the batch field it names.
* :class:`MicroBatchSelector` — a method that selects tokens from the *current* forward (Forking
  Tokens) gives the train pass a selector instead of a closure; the actor reads its declared needs.
* :class:`LossPlan` — which batch fields the train pass reads: advantages after credit transforms, a
  per-token loss weight, a per-token loss mask, the selector.

This module sits in the bottom layer (it imports only torch), so ``actor/`` and ``credit/`` both depend
on it and never on each other.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

__all__ = ["CreditNeeds", "Capture", "HeadView", "HeadObserver", "MicroBatchSelector", "LossPlan"]


@dataclass(frozen=True)
class CreditNeeds:
    """What the actor must provide for a method."""

    hidden: bool = False  # LM-head input h_t (post final norm), via a HeadObserver     [tokens, d]
    logp: bool = False  # old-policy log p(y_t)                                          [tokens]
    entropy: bool = False  # full-vocabulary entropy of the old policy at y_t's position [tokens]
    current_entropy: bool = False  # entropy of the *training* forward (Forking Tokens)
    extra_forward: bool = False  # needs no-grad re-scoring forwards (counterfactual spans)
    topk: int = 0  # global top-k logits/ids per token, shown to the observer (hidden-gradient proxy)


@runtime_checkable
class HeadObserver(Protocol):
    """Sees the LM head of every micro-batch of the old-log-prob pass (last pipeline stage only).

    Call order per rollout batch: ``begin`` → for each data pass p: ``observe`` per micro-batch, then
    ``end_pass(p)`` (a collective over the observer's own process group; True = run pass p+1) →
    ``values(key)`` per micro-batch and ``metrics()``. ``field`` names the token field the actor fills
    with ``values`` (entries of tokens this rank does not own stay 0).
    """

    field: str

    def begin(self, batch: Any, *, hidden_size: int, groups: Any, sequence_sharded: bool,
              device: torch.device) -> None: ...

    def observe(self, view: HeadView) -> None: ...

    def end_pass(self, p: int) -> bool: ...

    def values(self, key: Hashable) -> torch.Tensor: ...

    def metrics(self) -> dict[str, float]: ...


@dataclass
class HeadView:
    """One micro-batch at the LM head. Per-row tensors cover the whole packed row ``[S]``; this rank
    holds rows ``rows`` of it (its sequence-parallel shard, or all rows), and ``hidden`` is those rows
    only. Row j predicts ``targets[j]``, the batch token ``token_index[j]`` (−1 where nothing is
    predicted: padding, a sequence's last position)."""

    pass_index: int
    key: int  # the micro-batch's id, the same in every pass
    rows: slice  # this rank's rows of the packed row
    hidden: torch.Tensor  # [n, d] LM-head input (post final norm) of ``rows``
    logp: torch.Tensor  # [S] log p(y_t) at the sampling temperature
    entropy: torch.Tensor | None  # [S] or None
    topk_ids: torch.Tensor | None  # [S, K] global vocabulary ids of the top-K logits, or None
    topk_logits: torch.Tensor | None  # [S, K]
    targets: torch.Tensor  # [S] y_t (−1 where none), on the model's device
    token_index: torch.Tensor  # [S] flat rollout-batch index of y_t (−1 where none), on the CPU
    response: torch.Tensor  # [S] bool, y_t is a response token (enters loss and credit), on the device
    lm_head_weight: torch.Tensor  # [V/TP, d] this tensor-parallel rank's vocabulary rows
    vocab_start: int  # global id of this rank's first vocabulary row
    groups: Any  # delta_megatron.parallel.Groups


@runtime_checkable
class MicroBatchSelector(Protocol):
    """Selects loss tokens from the current training forward (per micro-batch)."""

    needs: CreditNeeds

    def select(self, entropy: torch.Tensor, mask: torch.Tensor, group: Any = None) -> torch.Tensor:
        """Bool [n]: the selected tokens among ``mask``; ``group`` holds the micro-batch's CP shards."""

    def count(self, n_valid: int) -> int:
        """Tokens the loss divides by for a micro-batch with ``n_valid`` valid tokens."""


@dataclass
class Capture:
    """What the old-log-prob pass records besides ``logp_old``."""

    entropy: bool = False
    topk: int = 0
    observers: list[HeadObserver] = field(default_factory=list)

    @classmethod
    def union(cls, needs: Iterable[CreditNeeds], observers: Iterable[HeadObserver] = (),
              entropy: bool = False) -> Capture:
        """The union of ``needs`` (``entropy`` adds what a caller other than a method wants, e.g.
        the trainer's entropy metric)."""
        needs = list(needs)
        return cls(entropy=entropy or any(n.entropy for n in needs),
                   topk=max([n.topk for n in needs], default=0), observers=list(observers))


@dataclass
class LossPlan:
    """What the train pass needs from credit assignment."""

    advantage_field: str = "advantage_tokens"  # per-token advantages after credit transforms
    weight_field: str | None = None  # per-token loss multiplier (DelTA λ̄ · counterfactual w)
    mask_field: str | None = None  # per-token 0/1 loss mask (DelTA token selection)
    selector: MicroBatchSelector | None = None  # Forking Tokens on the current entropy
    objective: Literal["policy", "sft"] = "policy"  # RL loss of algo, or token-mean NLL (warm-up)
