"""The ``reward`` section: which verifier, which reward values, and the verifier pool's limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from delta_megatron.utils.configs import Section, option

__all__ = ["RewardConfig"]


@dataclass
class RewardConfig(Section):
    """``kind``: ``math`` (math-verify in a killable process pool), ``exact_match`` (the synthetic task;
    in-process), ``auto`` (exact_match for ``synthetic:`` data, math otherwise). ``variant``: ``binary``
    rewards 1/0, ``dapo`` rewards +1/-1 (verl's ``math_dapo``). A sample the verifier could not judge
    (no answer, timeout, crash, error) is scored as a wrong answer: 0 (binary) or -1 (dapo), so a
    response cannot earn more by hanging the verifier than by answering wrongly."""

    kind: Literal["auto", "math", "exact_match"] = option(
        "auto", "verifier: math (math-verify pool), exact_match (synthetic task), auto (by data.train)")
    variant: Literal["binary", "dapo"] = option("binary", "reward values: binary 1/0, dapo +1/-1")
    num_workers: int = option(2, "verifier worker processes", ge=1)
    timeout_s: float = option(5.0, "hard per-sample limit (s); the worker is killed and replaced", gt=0)
    max_memory_mb: int | None = option(4096, "address-space limit per verifier worker (MiB); null = "
                                             "unlimited", ge=256)

    def resolved_kind(self, data_spec: str) -> str:
        """``kind`` with ``auto`` resolved against the training data spec (``DataConfig.train``)."""
        if self.kind != "auto":
            return self.kind
        return "exact_match" if data_spec.startswith("synthetic:") else "math"
