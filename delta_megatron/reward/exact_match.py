"""Exact-match reward for tasks whose answers are canonical strings (the synthetic arithmetic task).

No process pool: scoring runs in-process, so its time must be bounded by construction — string equality
is linear, the default extractor reads at most ``extract.MAX_CHARS`` characters in linear time, and
the synthetic task's ``extract`` is a split and a digit check. An ``extract_fn`` passed in must be
linear too (anything that may backtrack or call a solver belongs in the killable
:class:`~delta_megatron.reward.verifier_pool.VerifierPool`). It returns the same
``(rewards, VerifyStats)`` as the math reward, so the trainer does not care which one it holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Literal

from delta_megatron.reward.extract import extract_answer
from delta_megatron.reward.verifier_pool import VerifyStats

__all__ = ["ExactMatchReward", "apply_variant"]


def apply_variant(rewards: list[float], variant: Literal["binary", "dapo"]) -> list[float]:
    """Map binary rewards r in [0, 1] to the variant: binary keeps r, dapo gives 2r - 1 (so +1 / -1)."""
    if variant == "binary":
        return list(rewards)
    if variant == "dapo":
        return [2.0 * r - 1.0 for r in rewards]
    raise ValueError(f"variant: {variant!r} — one of 'binary', 'dapo'")


class ExactMatchReward:
    """1 if ``extract_fn(response)`` equals the gold string exactly, else 0 (variant-mapped).

    ``extract_fn`` returns the answer or None when the response has none (counted as ``no_answer``);
    the default reads the last ``\\boxed{}`` / ``Answer:`` line. The synthetic task passes its own.
    """

    def __init__(self, extract_fn: Callable[[str], str | None] | None = None,
                 variant: Literal["binary", "dapo"] = "binary"):
        apply_variant([], variant)  # reject a bad variant now, not at the first batch
        self.extract_fn = extract_fn or extract_answer
        self.variant = variant
        self.totals = VerifyStats()

    def score(self, items: Sequence[tuple[str, str]]) -> tuple[list[float], VerifyStats]:
        t0 = time.monotonic()
        stats = VerifyStats(total=len(items))
        binary: list[float] = []
        for response, gold in items:
            try:
                answer = self.extract_fn(response)
            except Exception:  # a broken extractor scores 0 and is counted, like a verifier error
                stats.errors += 1
                binary.append(0.0)
                continue
            if answer is None:
                stats.no_answer += 1
                binary.append(0.0)
            else:
                ok = answer == gold
                stats.correct += ok
                binary.append(1.0 if ok else 0.0)
        stats.seconds = time.monotonic() - t0
        self.totals = self.totals + stats
        return apply_variant(binary, self.variant), stats

    def close(self) -> None:
        """Nothing to release; present so every reward can be closed the same way."""

    def __enter__(self) -> ExactMatchReward:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
