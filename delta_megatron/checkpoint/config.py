"""The ``checkpoint`` section: where, how often and how many checkpoints; resume; the deadline."""

from __future__ import annotations

from dataclasses import dataclass

from delta_megatron.utils.configs import Section, fail, option


@dataclass
class CheckpointConfig(Section):
    dir: str | None = option(None, "checkpoint directory; null = <logging.dir>/checkpoints")
    every: int = option(0, "steps between saves; 0 = only at the end (and on preemption)", ge=0)
    keep: int = option(2, "newest finished checkpoints kept; older ones are deleted (never the newest)", ge=1)
    resume: str = option("none", "none, auto (newest checkpoint in dir that verifies, else start), or a "
                                 "checkpoint path")
    every_minutes: float = option(0.0, "wall-clock minutes between saves beside `every` (0: off)", ge=0)
    save_seconds: float = option(
        60.0, "how long a save takes, until one has been measured: before the job's end time the "
              "trainer saves once the time left is below this plus the longest stage seen (launch "
              "writes the planner's estimate)", gt=0)

    def validate(self) -> None:
        if self.dir is not None and not self.dir.strip():
            fail("dir", self.dir, "a directory, or null for <logging.dir>/checkpoints")
        if not self.resume.strip():
            fail("resume", self.resume, "none, auto or a checkpoint path")
