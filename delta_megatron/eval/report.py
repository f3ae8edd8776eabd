"""Evaluation tables: markdown (percent, for docs and logs) and CSV (fractions, for analysis).

One row per benchmark plus a question-count-weighted ``avg`` row, one column per metric
(``avg@16``, ``pass@16``, ...), so tables from different runs line up column for column.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

EvalResults = Any  # an eval.evaluate.EvalResults (duck-typed: evaluate builds its reports from here)

__all__ = ["to_markdown", "to_csv", "write_report", "compare_markdown", "AVG_ROW"]

AVG_ROW = "avg (weighted)"


def _rows(results: EvalResults) -> list[tuple[str, int, dict[str, float]]]:
    rows = [(b.name, b.n_questions, b.metrics()) for b in results.benchmarks]
    if results.benchmarks:
        rows.append((AVG_ROW, sum(b.n_questions for b in results.benchmarks), results.weighted))
    return rows


def to_markdown(results: EvalResults, percent: bool = True, digits: int = 2) -> str:
    """A GitHub markdown table; values in percent with ``digits`` decimals unless ``percent=False``."""
    metrics = results.metric_names()
    scale = 100.0 if percent else 1.0
    lines = ["| benchmark | questions | " + " | ".join(metrics) + " |",
             "|---|---:|" + "---:|" * len(metrics)]
    for name, n, vals in _rows(results):
        cells = " | ".join(f"{vals[m] * scale:.{digits}f}" for m in metrics)
        lines.append(f"| {name} | {n} | {cells} |")
    return "\n".join(lines) + "\n"


def to_csv(results: EvalResults) -> str:
    """CSV with header ``benchmark,questions,<metrics...>``; values are fractions at full precision."""
    metrics = results.metric_names()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["benchmark", "questions", *metrics])
    for name, n, vals in _rows(results):
        writer.writerow([name, n, *(repr(vals[m]) for m in metrics)])
    return buf.getvalue()


def write_report(results: EvalResults, out_dir: str | Path, stem: str = "eval") -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.csv`` under ``out_dir``; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, cs = out / f"{stem}.md", out / f"{stem}.csv"
    md.write_text(to_markdown(results), encoding="utf-8")
    cs.write_text(to_csv(results), encoding="utf-8")
    return md, cs


def compare_markdown(named: dict[str, EvalResults], extra: dict[str, dict[str, float]] | None = None,
                     digits: int = 2) -> str:
    """One table for several decodings of the same eval sets: a row per (decoding, benchmark) with the
    metrics in percent, plus per-decoding ``extra`` fractions (e.g. resampled tokens) in percent."""
    extra = extra or {}
    metrics = next(iter(named.values())).metric_names() if named else []
    cols = list(dict.fromkeys(c for vals in extra.values() for c in vals))  # first-seen order
    lines = ["| decoding | benchmark | questions | " + " | ".join(metrics + cols) + " |",
             "|---|---|---:|" + "---:|" * (len(metrics) + len(cols))]
    for label, results in named.items():
        if results.metric_names() != metrics:
            raise ValueError(f"decoding {label!r} has metrics {results.metric_names()}, expected {metrics}")
        for name, n, vals in _rows(results):
            cells = [f"{vals[m] * 100:.{digits}f}" for m in metrics]
            cells += [f"{extra[label][c] * 100:.{digits}f}" if c in extra.get(label, {}) else "–" for c in cols]
            lines.append(f"| {label} | {name} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
