"""Final-answer extraction from model responses, and gold wrapping for math-verify.

Extraction is ours (not math-verify's) so that every verifier (math-verify, DAPO ±1, exact match) reads
the *same* answer out of a response: the last complete ``\\boxed{...}`` (balanced braces, so nested
``\\frac{1}{2}`` survives), else the last ``Answer: ...`` line (the DAPO prompt format). Golds are plain
text in our data; math-verify parses a bare ``1/2`` or ``\\frac{1}{2}`` to nothing unless it sits in a
math environment, so golds and extracted answers are wrapped in ``$...$`` (PLATFORM.md).
"""

from __future__ import annotations

import re

__all__ = ["last_boxed", "answer_line", "extract_answer", "wrap_math", "normalise_text"]

_BOXED = re.compile(r"\\(?:boxed|fbox)\b")
# "Answer: 42", "**Answer:** 42", "Final Answer: $x=2$" at the start of a line (DAPO's format).
_ANSWER_LINE = re.compile(r"^[ \t>*_#]*(?:final[ \t]+)?answer[ \t]*(?:\*\*|__)?[ \t]*[:：](.*)$",
                          re.IGNORECASE | re.MULTILINE)


def _balanced(text: str, start: int) -> int | None:
    """Index just past the brace group opening at ``text[start] == '{'``, or None if unclosed.

    Escaped braces (``\\{``, ``\\}``: literal set braces in LaTeX) do not count."""
    depth, i = 0, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last complete, non-empty ``\\boxed{...}`` (or ``\\fbox{...}``/``\\boxed 5``).

    A truncated trailing ``\\boxed{...`` is skipped in favour of an earlier complete one."""
    for match in reversed(list(_BOXED.finditer(text))):
        i = match.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if i < len(text) and text[i] == "{":
            end = _balanced(text, i)
            if end is None:
                continue
            content = text[i + 1:end - 1].strip()
        elif i > match.end():  # "\boxed 5": the token up to whitespace or '$'
            content = re.match(r"[^\s$]*", text[i:]).group(0)
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
    while len(ans) >= 2 and ans[0] == "$" and ans[-1] == "$" and not ans.endswith("\\$"):
        ans = ans[1:-1].strip()
    return ans or None


def extract_answer(response: str) -> str | None:
    """The response's final answer: last ``\\boxed{}``, else last ``Answer:`` line, else None."""
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
