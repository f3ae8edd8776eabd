"""The data types every data source produces: :class:`Example` and :class:`PromptDataset`.

Their own module so that file loaders (``datasets``) and generators (``synthetic``) both depend on
them and not on each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

__all__ = ["DatasetError", "Example", "Message", "Prompt", "PromptDataset"]

Message = dict[str, str]
Prompt = Union[str, list[Message]]


class DatasetError(ValueError):
    """A dataset file or row is unusable; the message names the file (and row) and what is wrong."""


@dataclass(frozen=True)
class Example:
    """One prompt with its reference answer. ``prompt`` is the raw question text, or chat messages
    (``[{"role": "user", "content": ...}, ...]``) when the dataset ships them (verl style). ``origin``
    is where it was read (``file:line``), for errors about it later; it takes no part in equality."""

    id: str
    prompt: Prompt
    answer: str
    source: str
    origin: str = field(default="", compare=False)

    @property
    def messages(self) -> list[Message] | None:
        return self.prompt if isinstance(self.prompt, list) else None

    @property
    def problem(self) -> str:
        """The question text: the prompt string, or the last user message's content."""
        if isinstance(self.prompt, str):
            return self.prompt
        users = [m["content"] for m in self.prompt if m["role"] == "user"]
        return users[-1] if users else self.prompt[-1]["content"]


class PromptDataset(Sequence[Example]):
    """An ordered, indexable list of examples with a name (the benchmark name in eval reports)."""

    def __init__(self, name: str, examples: Sequence[Example], path: str | None = None):
        self.name, self.path = name, path
        self.examples: list[Example] = list(examples)
        self.dropped, self.dropped_ids = 0, []  # prompts left out by the length limit (data/limits.py)
        seen: dict[str, int] = {}
        for i, ex in enumerate(self.examples):
            if ex.id in seen:
                raise DatasetError(f"{path or name}: duplicate id {ex.id!r} (rows {seen[ex.id]} and {i})")
            seen[ex.id] = i

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return PromptDataset(self.name, self.examples[i], self.path)
        return self.examples[i]

    def __repr__(self) -> str:
        return f"PromptDataset({self.name!r}, {len(self)} examples)"
