"""The ``eval`` section: periodic evaluation during training (and the defaults of ``delta-megatron eval``)."""

from __future__ import annotations

from dataclasses import dataclass

from delta_megatron.eval.evaluate import EvalSettings
from delta_megatron.utils.configs import fail, validate


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations; 0 = off
    k: int = 16
    temperature: float = 1.0
    top_p: float = 0.7
    max_new_tokens: int = 32
    max_prompts: int | None = None

    def validate(self) -> None:
        if self.every < 0:
            fail("every", self.every, "must be >= 0 (0 = no periodic evaluation)")
        validate(self.settings())  # the evaluator's own rules, checked before any step runs

    def settings(self) -> EvalSettings:
        """What the evaluator runs with (avg@k / pass@k settings)."""
        return EvalSettings.from_config(self)
