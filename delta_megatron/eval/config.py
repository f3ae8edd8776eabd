"""The ``eval`` section: periodic evaluation during training (and the defaults of ``delta-megatron eval``)."""

from __future__ import annotations

from dataclasses import dataclass

from delta_megatron.eval.evaluate import EvalSettings
from delta_megatron.utils.configs import Section, option, validate


@dataclass
class EvalConfig(Section):
    every: int = option(0, "steps between evaluations (and one after the last step); 0 = off", ge=0)
    k: int = option(16, "samples per question (avg@k, pass@k)", ge=1)
    temperature: float = option(1.0, "sampling temperature; 0 = greedy", ge=0)
    top_p: float = option(0.7, "nucleus sampling mass", gt=0, le=1)
    max_new_tokens: int = option(32, "response budget in tokens", ge=1)
    max_prompts: int | None = option(None, "first N questions per benchmark; null = all", ge=1)

    def validate(self) -> None:
        validate(self.settings())  # the evaluator's own rules, checked before any step runs

    def settings(self) -> EvalSettings:
        """What the evaluator runs with (avg@k / pass@k settings)."""
        return EvalSettings.from_config(self)
