"""The ``data`` section: training and eval data, template, tokenizer, synthetic-task knobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class DataConfig:
    train: str = "synthetic:arith"  # a jsonl/parquet path, or synthetic:<task>
    eval: list[str] = field(default_factory=list)
    template: Literal["auto", "plain", "chat", "none"] = "auto"  # auto: none for synthetic data
    tokenizer: str | None = None  # HF tokenizer dir; default: model.hf_path, or the synthetic task's
    shuffle_seed: int = 0
    synthetic_digits: int = 3
    synthetic_size: int = 4096
    max_eval_rows: int | None = None

    @property
    def resolved_template(self) -> str:
        if self.template != "auto":
            return self.template
        return "none" if self.train.startswith("synthetic:") else "plain"
