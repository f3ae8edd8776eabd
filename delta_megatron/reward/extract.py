"""Final-answer extraction from model responses, and gold wrapping for math-verify.

Extraction is ours (not math-verify's) so that every verifier (math-verify, DAPO ±1, exact match) reads
the *same* answer out of a response: the last complete ``\\boxed{...}`` (balanced braces, so nested
``\\frac{1}{2}`` survives), else the last ``Answer: ...`` line (the DAPO prompt format). Golds are plain
text in our data; math-verify parses a bare ``1/2`` or ``\\frac{1}{2}`` to nothing unless it sits in a
math environment, so golds and extracted answers are wrapped in ``$...$`` (PLATFORM.md).

Extraction runs in-process (the exact-match reward) and must not be a way to hang a step: it reads at
most the last :data:`MAX_CHARS` characters of a response and is linear in them — braces are matched
in one left-to-right pass, and the ``Answer:`` pattern has no nested quantifiers. (An earlier version
rescanned from every ``\\boxed``: ``"\\boxed{" * 16000`` took 108 s.)
"""

from __future__ import annotations

import re

__all__ = ["last_boxed", "answer_line", "extract_answer", "wrap_math", "normalise_text", "MAX_CHARS"]

MAX_CHARS = 1 << 17
"""Extraction reads the last 131072 characters of a response (~32k tokens; the answer is at the end)."""

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
_BRACE_OR_ESCAPE = re.compile(r"\\[\s\S]|[{}]")  # an escape pair first: "\{" is a literal brace
_BLANKS = re.compile(r"[ \t]*")
_TOKEN = re.compile(r"[^\s$]*")
# "Answer: 42", "**Answer:** 42", "Final Answer: $x=2$" at the start of a line (DAPO's format). No two
# quantifiers may compete for the same characters (that backtracks quadratically on long blank runs).
_ANSWER_LINE = re.compile(r"^[ \t>*_#]*(?:final[ \t]+)?answer[ \t]*(?:(?:\*\*|__)[ \t]*)?[:：](.*)$",
                          re.IGNORECASE | re.MULTILINE)


def _closing_braces(text: str) -> dict[int, int]:
    """``{open index: index of its closing brace}`` for every balanced group, in one pass.
    Escaped braces (``\\{``, ``\\}``: literal set braces in LaTeX) do not count."""
    stack: list[int] = []
    closing: dict[int, int] = {}
    for m in _BRACE_OR_ESCAPE.finditer(text):
        ch = m.group()
        if ch == "{":
            stack.append(m.start())
        elif ch == "}" and stack:
            closing[stack.pop()] = m.start()
    return closing


def last_boxed(text: str) -> str | None:
    """Content of the last complete, non-empty ``\\boxed{...}`` (or ``\\fbox{...}``/``\\boxed 5``).

    A truncated trailing ``\\boxed{...`` is skipped in favour of an earlier complete one."""
    boxes = list(_BOXED.finditer(text))
    if not boxes:
        return None
    closing = _closing_braces(text)
    for match in reversed(boxes):
        i = _BLANKS.match(text, match.end()).end()
        if i < len(text) and text[i] == "{":
            end = closing.get(i)
            if end is None:
                continue
            content = text[i + 1:end].strip()  # an empty one holds no box: slices stay disjoint
        elif i > match.end():  # "\boxed 5": the token up to whitespace or '$'
            content = _TOKEN.match(text, i).group(0)
        else:
            continue
        if content:
            return content
    return None


def answer_line(text: str) -> str | None:
    """The answer on the last ``Answer: ...`` line, without surrounding ``$``/``\\( \\)`` or final period."""
    matches = [m.group(1).strip() for m in _ANSWER_LINE.finditer(text)]
    matches = [m for m in matches if m]
    if not matches:
        return None
    ans = matches[-1].strip("*_ \t")
    if ans.endswith("."):
        ans = ans[:-1].rstrip()
    if ans.startswith("\\(") and ans.endswith("\\)"):
        ans = ans[2:-2].strip()
    elif ans.startswith("\\[") and ans.endswith("\\]"):
        ans = ans[2:-2].strip()
    return _strip_dollars(ans) or None


def _strip_dollars(ans: str) -> str:
    """Peel ``$...$`` pairs (and the blanks inside each) by moving two indices: slicing once per pair
    would be quadratic in a run of dollars."""
    lo, hi = 0, len(ans)
    while hi - lo >= 2 and ans[lo] == "$" and ans[hi - 1] == "$" and ans[hi - 2] != "\\":
        lo, hi = lo + 1, hi - 1
        while lo < hi and ans[lo].isspace():
            lo += 1
        while hi > lo and ans[hi - 1].isspace():
            hi -= 1
    return ans[lo:hi]


def extract_answer(response: str, max_chars: int = MAX_CHARS) -> str | None:
    """The response's final answer: last ``\\boxed{}``, else last ``Answer:`` line, else None.
    Only the last ``max_chars`` characters are read (time linear in them)."""
    response = response[-max_chars:]
    boxed = last_boxed(response)
    return boxed if boxed is not None else answer_line(response)


def _has_unescaped_dollar(text: str) -> bool:
    return re.search(r"(?<!\\)\$", text) is not None


def wrap_math(text: str) -> str:
    """``text`` inside ``$...$`` unless it already carries math delimiters or a ``\\boxed``."""
    text = text.strip()
    if _has_unescaped_dollar(text) or "\\boxed" in text or text.startswith(("\\(", "\\[")):
        return text
    return f"${text}$"


def normalise_text(text: str) -> str:
    """Whitespace-free form for the cheap exact-string check that runs before symbolic comparison."""
    return re.sub(r"\s+", "", text)
