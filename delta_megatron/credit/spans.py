"""Reasoning-span detection for counterfactual span weighting (baselines.md §10, reference details).

Works on the *decoded string of each token* of one completion (``tokenizer.decode([id])`` per id), so
character offsets map back to tokens by cumulative length. Three pieces:

- the answer marker: the first of "final answer", "####" (case-insensitive, in that priority) found in
  the text, else "\\boxed{"; the reasoning region runs from the start to the marker's token, and never
  past the first pad/EOS (the caller passes that as ``end``);
- arithmetic spans: number, one or more (operator, number) pairs, "=", number. The reference wrote the
  operator set as one character class, ``[+\\-×*/÷\\\\times\\\\div]``, which also matches the backslash
  and the letters t i m e s d v (and so never matches ``\\times`` itself). ``arithmetic_quirk=False``
  (default) uses the intended operators + - × * / ÷ \\times \\div; True reproduces the class;
- sentence spans: boundaries at a token that is ".", "!" or "?" (stripped), a token containing
  "\\n\\n", or two consecutive "\\n" tokens (the reference's test of the latter compares a stripped
  token to "\\n" and never fires; we implement the described rule).

Filters, in the reference's order: spans with > 30% backslashes are dropped (LaTeX), at most
max_spans/2 arithmetic and max_spans sentences are detected, sentences overlapping an arithmetic span
are discarded, spans longer than ``max_span_tokens`` dropped, and the sorted total capped at max_spans.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field

ANSWER_MARKERS = ("final answer", "####")  # case-insensitive, in priority order
BOXED_MARKER = "\\boxed{"
FORMATTING_TOKENS = frozenset({"#", "##", "###", "####", "=", "==", "===", "====", "-", "--", "---"})

_NUMBER = r"\d+(?:\.\d+)?"
_OPERATOR = r"(?:[+\-×*/÷]|\\times|\\div)"
_OPERATOR_QUIRK = r"[+\-×*/÷\\times\\div]"  # one character class: + - × * / ÷ \ t i m e s d v


def arithmetic_pattern(quirk: bool = False) -> re.Pattern:
    op = _OPERATOR_QUIRK if quirk else _OPERATOR
    return re.compile(rf"{_NUMBER}(?:\s*{op}\s*{_NUMBER})+\s*=\s*{_NUMBER}")


@dataclass
class SpanLayout:
    """Where things are in one completion (token indices, ends exclusive)."""

    end: int  # first pad/EOS token (or the length): tokens >= end are padding
    reasoning_end: int  # = answer_start when a marker exists, else ``end``
    answer_start: int | None = None  # token holding the marker's first character
    answer_marker: str | None = None  # "final answer" | "####" | "\\boxed{"
    spans: list[tuple[int, int]] = field(default_factory=list)  # sorted [start, end)
    kinds: list[str] = field(default_factory=list)  # "arithmetic" | "sentence"

    @property
    def has_answer(self) -> bool:
        """An answer region with at least one token after the marker to score."""
        return self.answer_start is not None and self.answer_start + 1 < self.end


class _Offsets:
    """Character offsets of a token-string list, for char -> token mapping."""

    def __init__(self, tokens: list[str]):
        self.starts = [0]
        for t in tokens:
            self.starts.append(self.starts[-1] + len(t))

    def token_at(self, pos: int) -> int:
        """Index of the token whose characters contain ``pos`` (empty tokens never do)."""
        return bisect.bisect_right(self.starts, pos) - 1


def _backslash_heavy(text: str, limit: float) -> bool:
    return len(text) > 0 and text.count("\\") / len(text) > limit


def find_answer_marker(tokens: list[str], end: int) -> tuple[int | None, str | None]:
    """(token index, marker) of the answer marker within ``tokens[:end]``, or (None, None)."""
    text = "".join(tokens[:end])
    offsets = _Offsets(tokens[:end])
    lowered = text.lower()
    for marker in ANSWER_MARKERS:
        pos = lowered.find(marker)
        if pos >= 0:
            return offsets.token_at(pos), marker
    pos = text.find(BOXED_MARKER)
    if pos >= 0:
        return offsets.token_at(pos), BOXED_MARKER
    return None, None


def arithmetic_spans(tokens: list[str], end: int, max_spans: int, latex_max: float = 0.3,
                     quirk: bool = False) -> list[tuple[int, int]]:
    """Token spans [s, e) of arithmetic chains "a op b (op c …) = r" inside ``tokens[:end]``."""
    text = "".join(tokens[:end])
    offsets = _Offsets(tokens[:end])
    spans: list[tuple[int, int]] = []
    for match in arithmetic_pattern(quirk).finditer(text):
        if len(spans) >= max_spans:
            break
        s, e = offsets.token_at(match.start()), offsets.token_at(match.end() - 1) + 1
        if _backslash_heavy("".join(tokens[s:e]), latex_max):
            continue
        spans.append((s, e))
    return spans


def _is_newline(token: str) -> bool:
    return token.strip(" \t") == "\n"


def sentence_spans(tokens: list[str], end: int, max_spans: int, min_tokens: int = 5,
                   latex_max: float = 0.3) -> list[tuple[int, int]]:
    """Sentence spans [s, e) inside ``tokens[:end]``; the boundary token ends its sentence."""
    spans: list[tuple[int, int]] = []
    start = 0
    for i in range(end):
        tok = tokens[i]
        boundary = (tok.strip() in {".", "!", "?"} or "\n\n" in tok
                    or (_is_newline(tok) and i + 1 < end and _is_newline(tokens[i + 1])))
        if not boundary:
            continue
        stop = i + 1
        if stop - start >= min_tokens and not _backslash_heavy("".join(tokens[start:stop]), latex_max):
            spans.append((start, stop))
        start = stop
        if len(spans) >= max_spans:
            break
    tail_ok = start < end and end - start >= min_tokens and len(spans) < max_spans
    if tail_ok and not _backslash_heavy("".join(tokens[start:end]), latex_max):
        spans.append((start, end))  # trailing sentence without terminator (the reference adds it
        # even after the cap; the final cap in merge_spans makes that moot, so we respect the cap)
    return spans


def merge_spans(arith: list[tuple[int, int]], sentences: list[tuple[int, int]], max_span_tokens: int,
                max_spans: int) -> tuple[list[tuple[int, int]], list[str]]:
    """Arithmetic spans win over overlapping sentences; sort, drop long spans, cap the count."""
    merged = [(s, e, "arithmetic") for s, e in arith]
    for s, e in sentences:
        if all(e <= a or s >= b for a, b in arith):
            merged.append((s, e, "sentence"))
    merged.sort(key=lambda t: t[0])
    kept = [t for t in merged if t[1] - t[0] <= max_span_tokens][:max_spans]
    return [(s, e) for s, e, _ in kept], [k for _, _, k in kept]


def detect_spans(tokens: list[str], end: int | None = None, *, max_spans: int = 10,
                 min_sentence_tokens: int = 5, max_span_tokens: int = 50, latex_max: float = 0.3,
                 arithmetic_quirk: bool = False) -> SpanLayout:
    """Answer marker + reasoning spans of one completion. ``end``: index of the first pad/EOS token."""
    end = len(tokens) if end is None else min(end, len(tokens))
    answer_start, marker = find_answer_marker(tokens, end)
    reasoning_end = answer_start if answer_start is not None else end
    arith = arithmetic_spans(tokens, reasoning_end, max_spans // 2, latex_max, arithmetic_quirk)
    sent = sentence_spans(tokens, reasoning_end, max_spans, min_sentence_tokens, latex_max)
    spans, kinds = merge_spans(arith, sent, max_span_tokens, max_spans)
    return SpanLayout(end=end, reasoning_end=reasoning_end, answer_start=answer_start, answer_marker=marker,
                      spans=spans, kinds=kinds)


def formatting_mask(tokens: list[str]) -> list[bool]:
    """Tokens whose stripped text is a formatting token (#, ##, =, -, …): importance × 0.1 (§10)."""
    return [t.strip() in FORMATTING_TOKENS for t in tokens]
