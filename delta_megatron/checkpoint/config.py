"""The ``checkpoint`` section: where, how often and how many checkpoints; resume."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckpointConfig:
    dir: str | None = None  # default: <logging.dir>/checkpoints
    every: int = 0  # steps between saves; 0 = only at the end
    keep: int = 2
    resume: str = "none"  # none | auto | <path>
