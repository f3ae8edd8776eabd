"""The ``reward`` section: which verifier, which reward values, and the verifier pool's limits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from delta_megatron.utils.configs import check_range, fail

__all__ = ["RewardConfig"]


@dataclass
class RewardConfig:
    """``kind``: ``math`` (math-verify in a killable process pool), ``exact_match`` (the synthetic task;
    in-process), ``auto`` (exact_match for ``synthetic:`` data, math otherwise). ``variant``: ``binary``
    rewards 1/0, ``dapo`` rewards +1/-1 (verl's ``math_dapo``). A sample the verifier could not judge
    (no answer, timeout, crash, error) is scored as a wrong answer: 0 (binary) or -1 (dapo), so a
    response cannot earn more by hanging the verifier than by answering wrongly."""

    kind: Literal["auto", "math", "exact_match"] = "auto"
    variant: Literal["binary", "dapo"] = "binary"
    num_workers: int = 2
    timeout_s: float = 5.0  # hard per-sample limit; the worker is killed and replaced on expiry
    max_memory_mb: int | None = 4096  # RLIMIT_AS per verifier worker; null = unlimited

    def validate(self) -> None:
        if self.num_workers < 1:
            fail("num_workers", self.num_workers, "must be >= 1")
        check_range("timeout_s", self.timeout_s, 0, None, lo_open=True)
        if self.max_memory_mb is not None and self.max_memory_mb < 256:
            fail("max_memory_mb", self.max_memory_mb, "must be >= 256 (a worker imports sympy) or null")

    def resolved_kind(self, data_spec: str) -> str:
        """``kind`` with ``auto`` resolved against the training data spec (``DataConfig.train``)."""
        if self.kind != "auto":
            return self.kind
        return "exact_match" if data_spec.startswith("synthetic:") else "math"
