"""The colocated memory lifecycle: rollout → train → sync, as one explicit state machine.

When the rollout engine shares the actor's GPUs (``memory.colocate``), each phase keeps only what it
needs on the device, and the trainer moves between phases with one verb, ``Lifecycle.enter(phase)``:

=========  ==============================  =============================================
phase      engine (SGLang memory tags)     actor
=========  ==============================  =============================================
rollout    weights, kv_cache               weights (optimizer + grads on the host)
train      — (both tags released)          weights, grads, optimizer
sync       weights                         weights (optimizer + grads back on the host)
save       weights (kv_cache released)     weights, optimizer   (a checkpoint from rollout)
=========  ==============================  =============================================

Entering a phase first frees (engine ``release_memory_occupation``, actor ``offload``), then — after
every rank has returned its cached blocks to the driver (``torch.cuda.empty_cache``: SGLang is another
process) and a barrier, because rank 0 alone talks to the engine while every rank moves its actor
shard — allocates (``resume_memory_occupation``, ``onload``). The engine's weights come back before the
weight sync and its KV cache only after it (slime's order). ``memory.offload_weights`` also moves the
actor's weights to the host between the sync and the next train phase.

The moves are data (:func:`transitions`), so the planner's per-phase memory ledger
(``planner_model.memory_ledger``) is computed from the same table the trainer executes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from delta_megatron.utils.configs import Section, option

PHASES = ("rollout", "train", "sync")
ACTOR_PARTS = ("weights", "grads", "optimizer")
ENGINE_TAGS = ("weights", "kv_cache")  # SGLang's memory tags (rollout.engine.MEMORY_TAGS)
NEXT = {"start": "rollout", "rollout": "train", "train": "sync", "sync": "rollout"}


@dataclass
class MemoryConfig(Section):
    """The ``memory`` section: how the actor and a colocated rollout engine share the devices."""

    colocate: bool = option(True, "the rollout engine shares the actor's GPUs: release its weights and KV "
                                  "cache while training, offload the actor's state while generating")
    offload_optimizer: bool = option(True, "colocated: Adam state and fp32 main params to pinned host "
                                           "memory (and grad buffers freed) from the sync to the next train "
                                           "phase")
    offload_weights: bool = option(False, "colocated: the actor's weights to pinned host memory too, "
                                          "from after the weight sync to the next train phase")


@dataclass(frozen=True)
class Move:
    """One call of a transition: ``engine.<verb>_memory_occupation(parts)`` or ``actor.<verb>(parts)``."""

    target: Literal["engine", "actor"]
    verb: Literal["release", "resume", "offload", "onload"]
    parts: tuple[str, ...]

    @property
    def frees(self) -> bool:
        return self.verb in ("release", "offload")

    def components(self) -> tuple[str, ...]:
        """Ledger component names: the actor's parts as they are, ``engine <tag>`` for the engine."""
        return self.parts if self.target == "actor" else tuple(f"engine {t}" for t in self.parts)

    def __str__(self) -> str:
        return f"{self.target}.{self.verb}({', '.join(self.parts)})"


def transitions(cfg: MemoryConfig) -> dict[tuple[str, str], tuple[Move, ...]]:
    """(from phase, to phase) -> the moves made, frees before allocations. ``start`` is the state
    after construction and the first weight sync: everything resident."""
    if not cfg.colocate:
        return {(a, b): () for a, b in NEXT.items()}
    optimizer = ("optimizer", "grads") if cfg.offload_optimizer else ()
    weights = ("weights",) if cfg.offload_weights else ()
    table = {
        ("start", "rollout"): [Move("actor", "offload", optimizer + weights)],
        ("rollout", "train"): [Move("engine", "release", ("kv_cache", "weights")),
                               Move("actor", "onload", weights + optimizer)],
        ("train", "sync"): [Move("actor", "offload", optimizer), Move("engine", "resume", ("weights",))],
        ("sync", "rollout"): [Move("actor", "offload", weights), Move("engine", "resume", ("kv_cache",))],
    }
    return {key: tuple(m for m in moves if m.parts) for key, moves in table.items()}


def checkpoint_moves(cfg: MemoryConfig, phase: str) -> tuple[tuple[Move, ...], tuple[Move, ...]]:
    """(there, back): what a checkpoint from ``phase`` needs first — the actor's weights and optimizer
    state on the device (dist-ckpt reads them there) — and how to return to ``phase`` afterwards.
    From ``rollout`` the engine's KV cache makes room (its weights stay: no re-sync needed)."""
    if phase == "train" or not cfg.colocate:
        return (), ()
    if phase != "rollout":
        raise RuntimeError(f"lifecycle: checkpoints are taken in the rollout or train phase, not {phase}")
    parts = tuple(p for p, on in (("weights", cfg.offload_weights), ("optimizer", cfg.offload_optimizer)) if on)
    if not parts:
        return (), ()
    there = (Move("engine", "release", ("kv_cache",)), Move("actor", "onload", parts))
    back = (Move("actor", "offload", parts), Move("engine", "resume", ("kv_cache",)))
    return there, back


def resident(cfg: MemoryConfig) -> dict[str, set[str]]:
    """Device-resident state components in each phase (and ``save``), by replaying the moves:
    the actor's ``weights`` / ``grads`` / ``optimizer`` and ``engine weights`` / ``engine kv_cache``."""
    now = set(ACTOR_PARTS) | {f"engine {t}" for t in ENGINE_TAGS}
    table, out, phase = transitions(cfg), {}, "start"
    for _ in range(len(PHASES) + 1):  # start → rollout → train → sync → rollout
        nxt = NEXT[phase]
        now = _apply(now, table[(phase, nxt)])
        out[nxt], phase = set(now), nxt
    there, _ = checkpoint_moves(cfg, "rollout")
    out["save"] = _apply(out["rollout"], there)
    return out


def _apply(now: set[str], moves: tuple[Move, ...]) -> set[str]:
    now = set(now)
    for m in moves:
        now = now - set(m.components()) if m.frees else now | set(m.components())
    return now


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class Lifecycle:
    """Drives ``actor`` (every rank) and ``engine`` (the ranks that hold one, rank 0) through the
    phases. ``on_enter(phase)`` runs after each transition (the trainer logs the phase's memory)."""

    def __init__(self, cfg: MemoryConfig, actor: Any, engine: Any = None,
                 on_enter: Callable[[str], None] | None = None):
        self.cfg, self.actor, self.engine = cfg, actor, engine
        self.phase = "start"
        self.table = transitions(cfg)
        self.trace: list[tuple[str, str]] = []  # (phase entered, move made) in order
        self._on_enter = on_enter

    def enter(self, phase: str) -> None:
        """Move to ``phase``, the next one of rollout → train → sync → rollout."""
        if NEXT.get(self.phase) != phase:
            raise RuntimeError(f"lifecycle: cannot enter {phase!r} from {self.phase!r}; the cycle is "
                               "rollout → train → sync → rollout")
        self._apply(phase, self.table[(self.phase, phase)])
        self.phase = phase
        if self._on_enter is not None:
            self._on_enter(phase)

    @contextmanager
    def checkpoint(self) -> Iterator[None]:
        """The state a checkpoint needs (``checkpoint_moves``), then back to the current phase."""
        there, back = checkpoint_moves(self.cfg, self.phase)
        if not there:  # the state is on the device already (train phase, or nothing moves)
            yield
            return
        phase = self.phase
        self._apply("save", there)
        self.phase = "save"
        if self._on_enter is not None:
            self._on_enter("save")
        try:
            yield
        finally:
            self._apply(phase, back)
            self.phase = phase

    def _apply(self, phase: str, moves: tuple[Move, ...]) -> None:
        frees = [m for m in moves if m.frees]
        allocations = [m for m in moves if not m.frees]
        for m in frees:
            self._do(phase, m)
        if allocations:  # every rank has handed its freed and cached blocks back before any allocates
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # e.g. the sync's gathered weights, the train pass's activations
            _barrier()
        for m in allocations:
            self._do(phase, m)
        if any(m.target == "engine" for m in allocations):  # rank 0 resumed the servers: every data-
            _barrier()  # parallel leader generates through them next, none before they are back

    def _do(self, phase: str, m: Move) -> None:
        if m.target == "engine":
            if self.engine is None:
                return
            getattr(self.engine, f"{m.verb}_memory_occupation")(list(m.parts))
        else:
            getattr(self.actor, m.verb)(list(m.parts))
        self.trace.append((phase, str(m)))
