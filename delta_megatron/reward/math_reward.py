"""The math reward (math-verify in a :class:`VerifierPool`) and the factory the trainer calls.

Binary 1/0 is the DelTA paper's reward; ``dapo`` is verl's ``math_dapo`` convention (+1 correct, -1
otherwise). Both use the same extraction (last ``\\boxed{}``, else ``Answer:`` line) and the same
math-verify comparison; only the value mapping differs. DAPO's overlong penalty is reward *shaping* and
lives in ``algo/overlong.py``, applied after this.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol

from delta_megatron.reward.config import RewardConfig
from delta_megatron.reward.exact_match import ExactMatchReward, apply_variant
from delta_megatron.reward.verifier_pool import DEFAULT_SCORE_FN, ScoreFn, VerifierPool, VerifyStats

__all__ = ["MathReward", "RewardFn", "build_reward"]


class RewardFn(Protocol):
    """What the trainer and ``evaluate`` hold: batched scoring plus counters, and ``close``."""

    def score(self, items: Sequence[tuple[str, str]]) -> tuple[list[float], VerifyStats]: ...

    def close(self) -> None: ...


class MathReward:
    """math-verify reward over a killable process pool; see :class:`RewardConfig` for the knobs."""

    def __init__(self, cfg: RewardConfig | None = None, score_fn: ScoreFn | str | None = None):
        cfg = cfg or RewardConfig(kind="math")
        self.cfg = cfg
        self.variant: Literal["binary", "dapo"] = cfg.variant
        apply_variant([], cfg.variant)
        self.pool = VerifierPool(cfg.num_workers, cfg.timeout_s, score_fn or DEFAULT_SCORE_FN,
                                 max_memory_mb=cfg.max_memory_mb)

    @property
    def totals(self) -> VerifyStats:
        return self.pool.totals

    def score(self, items: Sequence[tuple[str, str]]) -> tuple[list[float], VerifyStats]:
        binary, stats = self.pool.score(items)
        return apply_variant(binary, self.variant), stats

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> MathReward:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_reward(cfg: RewardConfig, data_spec: str = "",
                 extract_fn: Callable[[str], str | None] | None = None) -> MathReward | ExactMatchReward:
    """The reward for ``cfg`` (``auto`` resolved against ``data_spec``, e.g. ``DataConfig.train``).

    For the synthetic task pass ``extract_fn=ArithmeticTask(...).extract``."""
    kind = cfg.resolved_kind(data_spec)
    if kind == "exact_match":
        return ExactMatchReward(extract_fn, cfg.variant)
    return MathReward(cfg)
