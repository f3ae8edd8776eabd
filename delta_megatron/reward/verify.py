"""The math-verify check that runs inside a verifier worker process.

math-verify's own timeouts use ``signal.alarm`` and cannot interrupt a long C-level computation (a huge
integer power), so they are switched off here: the :class:`~delta_megatron.reward.verifier_pool.VerifierPool`
enforces one hard timeout from outside by killing the worker, and counts it. Golds repeat across the
samples of a group, so their parses are cached per worker.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from math_verify import parse, verify

from delta_megatron.reward.extract import extract_answer, normalise_text, wrap_math

__all__ = ["math_verify_score", "parse_gold", "warmup"]

# math-verify warns on every call that its timeout is disabled; the pool owns the timeout.
logging.getLogger("math_verify").setLevel(logging.ERROR)


@lru_cache(maxsize=4096)
def parse_gold(gold: str) -> tuple:
    """math-verify parse of a plain-text gold (wrapped in ``$...$``); a gold that parses to nothing is a
    data error, raised so the pool counts it under ``errors`` instead of silently scoring 0."""
    parsed = parse(wrap_math(gold), parsing_timeout=None)
    if not parsed:
        raise ValueError(f"gold answer {gold!r} parses to nothing in math-verify")
    return tuple(parsed)


def math_verify_score(response: str, gold: str) -> float | None:
    """1.0 if the response's final answer equals ``gold`` (math-verify), 0.0 if not, None if the response
    has no extractable answer (no ``\\boxed{}`` and no ``Answer:`` line)."""
    answer = extract_answer(response)
    if answer is None:
        return None
    if normalise_text(answer) == normalise_text(gold):
        return 1.0
    pred = parse(wrap_math(answer), parsing_timeout=None)
    if not pred:
        return 0.0
    return 1.0 if verify(list(parse_gold(gold)), pred, timeout_seconds=None) else 0.0


def warmup() -> None:
    """Exercise the cold paths of latex2sympy/sympy once (~0.2 s), so a fresh worker's first sample is
    not charged for them against its timeout. The pool calls this before a worker reports ready."""
    for response, gold in (("\\boxed{0.5}", "\\frac{1}{2}"), ("Answer: $\\pi/4$", "\\dfrac{\\pi}{4}"),
                           ("\\boxed{(1, 2)}", "(1,2)"), ("\\boxed{No}", "Yes"), ("\\boxed{x=3}", "3")):
        math_verify_score(response, gold)
    parse_gold.cache_clear()
