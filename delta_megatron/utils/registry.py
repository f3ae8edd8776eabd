"""Name → implementation registries (advantage estimators, policy losses, credit methods).

One style for every pluggable piece, after verl's ``register_policy_loss``: an implementation
registers itself where it is defined; configs validate names against the registry and error
messages list what is registered, so adding a method never means editing a list elsewhere.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` above a function or class."""

        def add(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; " + self.unknown(name))
        return self._items[name]

    def unknown(self, name: object) -> str:
        """What a config error says about an unknown name: the registered ones (and the closest)."""
        close = difflib.get_close_matches(str(name), self.names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return "allowed: " + ", ".join(repr(n) for n in self.names()) + hint

    def names(self) -> tuple[str, ...]:
        """Registered names in registration order (the package's import order)."""
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
