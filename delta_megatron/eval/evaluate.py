"""Sampling evaluation over benchmarks: k samples per question, scored by a reward, summarised as
avg@k and pass@k per benchmark and question-count weighted across benchmarks.

The evaluator knows nothing about engines: it takes ``generate_fn(prompts, n, temperature, top_p,
max_new_tokens) -> list[list[str]]`` (the rollout engine provides one; tests pass a deterministic
stub) and any reward with ``score(pairs) -> (rewards, stats)``. A sample counts as correct when its
reward is > 0, which holds for binary 1/0 and DAPO +1/-1 rewards alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from delta_megatron.data.datasets import Example
from delta_megatron.eval.metrics import avg_at_k, mean_pass_at_k, weighted_average
from delta_megatron.reward.verifier_pool import VerifyStats
from delta_megatron.utils.configs import Section, fail, option, validate

__all__ = ["EvalSettings", "GenerateFn", "QuestionResult", "BenchmarkResult", "EvalResults", "evaluate"]

GenerateFn = Callable[[list[str], int, float, float, int], list[list[str]]]


@dataclass
class EvalSettings(Section):
    """Defaults are the DelTA protocol (App. I): 16 samples per question, temperature 1.0, top-p 0.7,
    30k new tokens, mean over all samples (avg@16). ``pass_ks`` defaults to ``(k,)``."""

    k: int = option(16, "samples per question", ge=1)
    temperature: float = option(1.0, "sampling temperature; 0 = greedy", ge=0)
    top_p: float = option(0.7, "nucleus sampling mass", gt=0, le=1)
    max_new_tokens: int = option(30000, "response budget in tokens", ge=1)
    pass_ks: tuple[int, ...] | None = option(None, "k values of pass@k; null = (k,)", ge=1)
    prompts_per_call: int = option(64, "prompts handed to generate_fn at once", ge=1)
    max_prompts: int | None = option(None, "first N questions per benchmark (quick evals); null = all", ge=1)

    def validate(self) -> None:
        if self.pass_ks is not None and any(kk > self.k for kk in self.pass_ks):
            fail("pass_ks", self.pass_ks, f"each k must be in [1, k={self.k}]")

    @property
    def ks(self) -> tuple[int, ...]:
        return self.pass_ks if self.pass_ks is not None else (self.k,)

    @classmethod
    def from_config(cls, cfg: Any) -> EvalSettings:
        """Settings from the run config's ``eval`` section (``delta_megatron.config.EvalConfig``)."""
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{f: getattr(cfg, f) for f in names if hasattr(cfg, f)})


@dataclass
class QuestionResult:
    id: str
    n: int  # samples
    c: int  # correct samples
    rewards: list[float] = field(default_factory=list)


@dataclass
class BenchmarkResult:
    name: str
    k: int
    avg_at_k: float
    pass_at_k: dict[int, float]
    questions: list[QuestionResult]
    reward_stats: VerifyStats = field(default_factory=VerifyStats)

    @property
    def n_questions(self) -> int:
        return len(self.questions)

    def metrics(self) -> dict[str, float]:
        """``{"avg@16": ..., "pass@16": ...}`` as fractions in [0, 1]."""
        return {f"avg@{self.k}": self.avg_at_k, **{f"pass@{kk}": v for kk, v in self.pass_at_k.items()}}


@dataclass
class EvalResults:
    settings: EvalSettings
    benchmarks: list[BenchmarkResult]

    def metric_names(self) -> list[str]:
        return list(self.benchmarks[0].metrics()) if self.benchmarks else []

    @property
    def weighted(self) -> dict[str, float]:
        """Question-count-weighted average of every metric over the benchmarks."""
        weights = {b.name: b.n_questions for b in self.benchmarks}
        return {m: weighted_average({b.name: b.metrics()[m] for b in self.benchmarks}, weights)
                for m in self.metric_names()}

    def as_metrics(self, prefix: str = "eval/") -> dict[str, float]:
        """Flat scalars for the metrics logger: ``eval/<bench>/<metric>`` and ``eval/avg/<metric>``."""
        out = {f"{prefix}{b.name}/{m}": v for b in self.benchmarks for m, v in b.metrics().items()}
        if self.benchmarks:
            out.update({f"{prefix}avg/{m}": v for m, v in self.weighted.items()})
        return out

    def to_markdown(self, percent: bool = True, digits: int = 2) -> str:
        from delta_megatron.eval.report import to_markdown

        return to_markdown(self, percent=percent, digits=digits)

    def to_csv(self) -> str:
        from delta_megatron.eval.report import to_csv

        return to_csv(self)


def _score(reward_fn: Any, pairs: list[tuple[str, str]]) -> tuple[list[float], VerifyStats]:
    out = reward_fn.score(pairs) if hasattr(reward_fn, "score") else reward_fn(pairs)
    rewards, stats = out if isinstance(out, tuple) else (out, VerifyStats(total=len(pairs)))
    if len(rewards) != len(pairs):
        raise ValueError(f"reward_fn returned {len(rewards)} rewards for {len(pairs)} samples")
    return list(rewards), stats


def evaluate(generate_fn: GenerateFn, datasets: Mapping[str, Sequence[Example]] | Sequence[Any],
             reward_fn: Any, settings: EvalSettings | None = None,
             prompt_fn: Callable[[Example], str] | None = None) -> EvalResults:
    """Generate ``settings.k`` samples per question of every dataset, score them, and summarise.

    ``datasets``: ``{name: examples}`` or a sequence of named datasets (``PromptDataset``).
    ``prompt_fn`` maps an example to what ``generate_fn`` receives (default: the raw question text;
    e.g. ``lambda ex: render_prompt(ex, "plain")``, or ``lambda ex: ex`` for engines that render).
    """
    settings = settings or EvalSettings()
    validate(settings)
    named = list(datasets.items()) if isinstance(datasets, Mapping) else [(d.name, d) for d in datasets]
    prompt_fn = prompt_fn or (lambda ex: ex.problem)
    results = []
    for name, examples in named:
        examples = list(examples)[:settings.max_prompts]
        if not examples:
            raise ValueError(f"benchmark {name!r} has no questions")
        questions: list[QuestionResult] = []
        stats = VerifyStats()
        for start in range(0, len(examples), settings.prompts_per_call):
            chunk = examples[start:start + settings.prompts_per_call]
            texts = generate_fn([prompt_fn(ex) for ex in chunk], settings.k, settings.temperature,
                                settings.top_p, settings.max_new_tokens)
            if len(texts) != len(chunk) or any(len(t) != settings.k for t in texts):
                raise ValueError(f"generate_fn returned {[len(t) for t in texts]} samples for "
                                 f"{len(chunk)} prompts; expected {settings.k} per prompt")
            pairs = [(text, ex.answer) for ex, samples in zip(chunk, texts) for text in samples]
            rewards, chunk_stats = _score(reward_fn, pairs)
            stats = stats + chunk_stats
            for j, ex in enumerate(chunk):
                r = rewards[j * settings.k:(j + 1) * settings.k]
                questions.append(QuestionResult(ex.id, settings.k, sum(x > 0 for x in r), r))
        counts = [(q.n, q.c) for q in questions]
        results.append(BenchmarkResult(
            name=name, k=settings.k,
            avg_at_k=sum(avg_at_k([x > 0 for x in q.rewards]) for q in questions) / len(questions),
            pass_at_k={kk: mean_pass_at_k(counts, kk) for kk in settings.ks},
            questions=questions, reward_stats=stats))
    return EvalResults(settings, results)
