"""Deterministic epoch shuffling with a resumable cursor.

Resuming a run must replay exactly the prompts an uninterrupted run would have seen, or a resumed
curve is a different experiment. So the order of epoch ``e`` is a pure function of ``(seed, e,
num_items)`` — a Fisher-Yates shuffle driven by a SHA-256-derived seed, stable across processes and
Python versions — and the state is just ``(epoch, cursor)``. Batches run across epoch boundaries
without dropping or repeating items.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

__all__ = ["EpochSampler", "PromptStream"]

T = TypeVar("T")


def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"epoch-shuffle/{seed}/{epoch}".encode()).digest()[:8], "little")


class EpochSampler:
    """Indices ``0..num_items-1``, reshuffled every epoch, consumed through :meth:`next`."""

    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True):
        if num_items < 1:
            raise ValueError(f"num_items: {num_items!r} — must be >= 1 (empty dataset?)")
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order: list[int] | None = None

    def order(self, epoch: int) -> list[int]:
        """The full index order of ``epoch``."""
        idx = list(range(self.num_items))
        if self.shuffle:
            random.Random(_epoch_seed(self.seed, epoch)).shuffle(idx)
        return idx

    def _current(self) -> list[int]:
        if self._order is None:
            self._order = self.order(self.epoch)
        return self._order

    def next(self, n: int) -> list[int]:
        """The next ``n`` indices, continuing into the next epoch when this one runs out."""
        if n < 0:
            raise ValueError(f"n: {n!r} — must be >= 0")
        out: list[int] = []
        while len(out) < n:
            order = self._current()
            take = min(n - len(out), self.num_items - self.cursor)
            out.extend(order[self.cursor:self.cursor + take])
            self.cursor += take
            if self.cursor == self.num_items:
                self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
        return out

    @property
    def consumed(self) -> int:
        """Indices handed out so far (all epochs)."""
        return self.epoch * self.num_items + self.cursor

    def state_dict(self) -> dict[str, Any]:
        return {"num_items": self.num_items, "seed": self.seed, "shuffle": self.shuffle,
                "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``. A different dataset size, seed or shuffle flag is an error: the
        remaining order would silently differ from the interrupted run's."""
        for key in ("num_items", "seed", "shuffle"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"sampler state {key}={state.get(key)!r} does not match this sampler's "
                                 f"{key}={getattr(self, key)!r}; resuming would change the data order")
        epoch, cursor = int(state["epoch"]), int(state["cursor"])
        if epoch < 0 or not 0 <= cursor < self.num_items:
            raise ValueError(f"sampler state epoch={epoch}, cursor={cursor} out of range "
                             f"(num_items={self.num_items})")
        self.epoch, self.cursor, self._order = epoch, cursor, None


class PromptStream(Generic[T]):
    """Batches of dataset items in sampler order: what the trainer pulls one step at a time."""

    def __init__(self, dataset: Sequence[T], batch_size: int, seed: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size: {batch_size!r} — must be >= 1")
        self.dataset, self.batch_size = dataset, batch_size
        self.sampler = EpochSampler(len(dataset), seed, shuffle)

    def next(self, n: int | None = None) -> list[T]:
        """The next ``n`` items (default ``batch_size``; dynamic sampling draws a multiple)."""
        return [self.dataset[i] for i in self.sampler.next(self.batch_size if n is None else n)]

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])
