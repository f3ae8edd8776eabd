"""When to save: every N steps, every M minutes, and before the job runs out of time.

The trainer can only stop at a stage boundary (after the rollout, after each optimizer step, after
the weight sync, after the step), so before the job's end time it must stop while a whole stage and
a save still fit: at each boundary it stops once

    time left  <  save time + the longest stage seen so far.

The save time is ``checkpoint.save_seconds`` (the planner's estimate; launch writes it) until saves
have been measured, then the larger of it and the slowest measured save.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from delta_megatron.checkpoint.config import CheckpointConfig


class SaveSchedule:
    """Stage timing, the deadline rule and the periodic (steps / minutes) cadence."""

    def __init__(self, cfg: CheckpointConfig, end_time: float | None, total_steps: int,
                 clock: Callable[[], float] = time.time):
        self.cfg, self.end_time, self.total_steps, self.clock = cfg, end_time, total_steps, clock
        self.save_s = cfg.save_seconds
        self.longest: tuple[str, float] = ("", 0.0)  # the longest stage seen: (name, seconds)
        self._mark = self._last_save = clock()

    def mark(self, stage: str) -> float:
        """A stage named ``stage`` just ended: its duration (kept if it is the longest)."""
        now = self.clock()
        seconds, self._mark = now - self._mark, now
        if seconds > self.longest[1]:
            self.longest = (stage, seconds)
        return seconds

    def time_left(self) -> float | None:
        return None if self.end_time is None else self.end_time - self.clock()

    def deadline_near(self) -> bool:
        """Stop now: the next stage (as long as the longest so far) and a save might not both fit."""
        left = self.time_left()
        return left is not None and left < self.save_s + self.longest[1]

    def periodic_due(self, step: int) -> bool:
        """A save after ``step`` (0-based): every ``every`` steps, every ``every_minutes``, the last."""
        every, minutes = self.cfg.every, self.cfg.every_minutes
        return (step + 1 == self.total_steps or bool(every and (step + 1) % every == 0)
                or bool(minutes and self.clock() - self._last_save >= 60 * minutes))

    def saved(self, seconds: float) -> None:
        """A save took ``seconds``: the deadline rule uses the slowest one from now on."""
        self.save_s = max(self.save_s, seconds)
        self._last_save = self.clock()
        self._mark = self._last_save  # the save is not part of the next stage
