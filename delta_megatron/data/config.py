"""The ``data`` section: training and eval data, template, tokenizer, synthetic-task knobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from delta_megatron.data.synthetic import MAX_SCAFFOLD_SHARE, spec_variant
from delta_megatron.utils.configs import ConfigError, Section, fail, option


@dataclass
class DataConfig(Section):
    train: str = option("synthetic:arith", "training prompts: a jsonl/parquet path, or synthetic:<task>")
    eval: list[str] = option(doc="eval sets (paths or registered names) for periodic and final eval",
                             default_factory=list)
    template: Literal["auto", "plain", "chat", "none"] = option(
        "auto", "prompt template; auto: none for synthetic data, plain otherwise")
    tokenizer: str | None = option(None, "HF tokenizer dir; null = model.hf_path, or the synthetic task's")
    shuffle_seed: int = option(0, "seed of the prompt order (and of the synthetic task's data)", ge=0)
    synthetic_digits: int = option(3, "synthetic task: operand digits of RL/eval prompts", ge=1, le=30)
    synthetic_size: int = option(4096, "synthetic task: prompts in the training set", ge=1)
    synthetic_scaffold_share: float = option(
        0.0, "synthetic:arith-scratchpad: share of scaffold tokens per step (0 = compact pairs)",
        ge=0.0, le=MAX_SCAFFOLD_SHARE)
    max_eval_rows: int | None = option(None, "first N rows of each eval set; null = all", ge=1)

    @property
    def resolved_template(self) -> str:
        if self.template != "auto":
            return self.template
        return "none" if self.train.startswith("synthetic:") else "plain"

    def validate(self) -> None:
        if not self.train.strip():
            fail("train", self.train, "a jsonl/parquet path or synthetic:<task>")
        if self.train.startswith("synthetic:"):
            try:
                spec_variant(self.train)
            except (ValueError, KeyError, ConfigError) as err:
                fail("train", self.train, str(err))
        for i, spec in enumerate(self.eval):
            if not spec.strip():
                fail(f"eval[{i}]", spec, "a path or a registered eval set name")
        if self.tokenizer == "":
            fail("tokenizer", "", "a tokenizer directory or null")
