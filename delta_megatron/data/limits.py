"""Prompt-length limit: prompts longer than ``rollout.max_prompt_len`` tokens never reach the engine.

Why up front: an over-long prompt used to go to the engine as is — a 200-character prompt trained past
the model's ``max_position_embeddings``, and a few 1 MB prompts grew the trainer until the kernel
killed it. Every prompt is encoded once when the run starts (with the run's template, so the count is
what the engine would see); long ones are dropped with a count and an example id in the log, or, with
``rollout.long_prompts=fail``, the run stops naming the file and row before any step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from delta_megatron.data.types import DatasetError, Example, PromptDataset

__all__ = ["limit_prompt_length"]

log = logging.getLogger(__name__)


def limit_prompt_length(dataset: PromptDataset, encode: Callable[[Example], list[int]], max_len: int,
                        on_long: Literal["drop", "fail"] = "drop") -> PromptDataset:
    """``dataset`` without prompts of more than ``max_len`` tokens; the result's ``dropped`` is how
    many went (and ``dropped_ids`` which). ``on_long='fail'`` raises DatasetError at the first one."""
    kept, dropped = [], []
    for ex in dataset:
        n = len(encode(ex))
        if n <= max_len:
            kept.append(ex)
            continue
        if on_long == "fail":
            raise DatasetError(f"{ex.origin or dataset.path or dataset.name}: prompt of example {ex.id!r} is "
                               f"{n} tokens, longer than rollout.max_prompt_len={max_len} (set "
                               "rollout.long_prompts=drop to skip such prompts)")
        dropped.append((ex.id, n))
    if not kept:
        raise DatasetError(f"{dataset.path or dataset.name}: every one of the {len(dataset)} prompts is longer "
                           f"than rollout.max_prompt_len={max_len} tokens (e.g. {dropped[0][0]!r}: "
                           f"{dropped[0][1]} tokens)")
    out = PromptDataset(dataset.name, kept, dataset.path) if dropped else dataset
    out.dropped = len(dropped)
    out.dropped_ids = [i for i, _ in dropped]
    if dropped:
        log.warning("%s: dropped %d of %d prompts longer than rollout.max_prompt_len=%d tokens "
                    "(e.g. %r: %d tokens)", dataset.path or dataset.name, len(dropped), len(dataset),
                    max_len, *dropped[0])
    return out
