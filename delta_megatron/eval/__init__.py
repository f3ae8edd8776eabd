"""Evaluation: avg@k / unbiased pass@k over benchmarks, question-count-weighted averages, reports."""

from delta_megatron.eval.evaluate import (
    BenchmarkResult,
    EvalResults,
    EvalSettings,
    GenerateFn,
    QuestionResult,
    evaluate,
)
from delta_megatron.eval.metrics import avg_at_k, mean_pass_at_k, pass_at_k, weighted_average
from delta_megatron.eval.report import compare_markdown, to_csv, to_markdown, write_report

__all__ = [
    "BenchmarkResult", "EvalResults", "EvalSettings", "GenerateFn", "QuestionResult", "evaluate",
    "avg_at_k", "mean_pass_at_k", "pass_at_k", "weighted_average", "to_csv", "to_markdown", "write_report",
    "compare_markdown",
]
