"""``delta-megatron study report DIR``: per method, over the seeds that finished,

* final held-out avg@k (the last evaluation),
* area under the held-out curve (normalised trapezoid: the mean held-out accuracy over training),
* final train reward (mean ``rollout/reward_mean`` of the last ``tail`` steps),
* steps to reach the baseline's final accuracy (the mean over the baseline's seeds; the first
  evaluation at or above it; ∞ when never — the claim of the counterfactual-span paper is that a
  method reaches DAPO's final accuracy earlier),

with mean (median for the steps, which may be ∞) and a 95 % bootstrap CI, and against the baseline a
one-sided Mann–Whitney U p-value (H1: the method is better), Holm-adjusted over the methods, and
Vargha–Delaney A. Writes ``study.md``, ``study.csv`` (one row per method and metric), ``runs.csv``
(one row per run), ``curves.png`` (held-out accuracy and train reward, mean over seeds with a 95 %
bootstrap band), ``seeds.png`` (every seed as a dot) and token clouds of the DelTA methods.
"""

from __future__ import annotations

import csv
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from delta_megatron.study.plan import RunSpec, StudyManifest, fmt_seconds, read_rows, read_status, run_state
from delta_megatron.study.presets import is_delta
from delta_megatron.study.stats import (
    Comparison,
    Interval,
    area_under_curve,
    bootstrap_ci,
    compare,
    first_reaching,
    holm,
)
from delta_megatron.utils.configs import ConfigError

EVAL_KEY = re.compile(r"^eval/avg/avg@(\d+)$")


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    higher_is_better: bool
    median: bool = False  # summarise by the median (values may be infinite)


METRICS = (
    Metric("final_acc", "final held-out avg@k", True),
    Metric("auc", "area under held-out curve", True),
    Metric("final_reward", "final train reward", True),
    Metric("steps_to_baseline", "steps to baseline's final acc", False, median=True),
)


@dataclass
class RunResult:
    spec: RunSpec
    eval_x: list[int]
    eval_y: list[float]
    reward_x: list[int]
    reward_y: list[float]
    values: dict[str, float] = field(default_factory=dict)
    wall_s: float = math.nan
    cpu_s: float = math.nan


@dataclass
class MethodSummary:
    method: str
    n: int
    summary: dict[str, Interval]
    versus: dict[str, Comparison]
    reached: int = 0  # runs reaching the baseline's final accuracy


@dataclass
class StudyResult:
    manifest: StudyManifest
    baseline: str
    k: int | None
    threshold: float
    results: list[RunResult]
    excluded: list[tuple[RunSpec, str]]
    methods: list[MethodSummary]


def eval_k(rows: list[dict]) -> int | None:
    for row in rows:
        for key in row:
            m = EVAL_KEY.match(key)
            if m:
                return int(m.group(1))
    return None


def load_run(spec: RunSpec, tail: int, k: int | None) -> RunResult:
    rows = read_rows(spec.dir)
    key = f"eval/avg/avg@{k}" if k is not None else None
    ev = [(r["step"] + 1, r[key]) for r in rows if key and key in r]
    rw = [(r["step"] + 1, r["rollout/reward_mean"]) for r in rows if "rollout/reward_mean" in r]
    res = RunResult(spec, [x for x, _ in ev], [y for _, y in ev], [x for x, _ in rw], [y for _, y in rw])
    res.values["final_acc"] = res.eval_y[-1] if ev else math.nan
    res.values["auc"] = area_under_curve(res.eval_x, res.eval_y) if ev else math.nan
    last = res.reward_y[-tail:]
    res.values["final_reward"] = float(np.mean(last)) if last else math.nan
    status = read_status(spec.dir)
    res.wall_s, res.cpu_s = status.get("wall_s", math.nan), status.get("cpu_s", math.nan)
    return res


def analyse(manifest: StudyManifest, baseline: str | None = None, tail: int = 5) -> StudyResult:
    """Read every run of the study and compute the per-method statistics."""
    baseline = baseline or manifest.baseline
    if baseline not in manifest.methods:
        raise ConfigError("baseline", baseline, f"one of the study's methods: {', '.join(manifest.methods)}")
    done, excluded = [], []
    for spec in manifest.runs:
        state = run_state(spec)
        (done if state == "done" else excluded).append(spec if state == "done" else (spec, state))
    if not done:
        counts = {}
        for _, state in excluded:
            counts[state] = counts.get(state, 0) + 1
        raise ConfigError("study_dir", "no finished runs",
                          f"{len(manifest.runs)} runs, none finished ({', '.join(f'{n} {s}' for s, n in counts.items()) or 'no runs'}); "
                          "run (or resume) the study first")
    k = next((k for k in (eval_k(read_rows(s.dir)) for s in done) if k is not None), None)
    results = [load_run(s, tail, k) for s in done]
    base_final = [r.values["final_acc"] for r in results if r.spec.method == baseline]
    threshold = float(np.nanmean(base_final)) if base_final and not all(map(math.isnan, base_final)) else math.nan
    for r in results:
        r.values["steps_to_baseline"] = (first_reaching(r.eval_x, r.eval_y, threshold)
                                         if r.eval_x and not math.isnan(threshold) else math.nan)
    methods = []
    for method in manifest.methods:
        mine = [r for r in results if r.spec.method == method]
        if not mine:
            continue
        summary, versus = {}, {}
        for metric in METRICS:
            values = _finite_or_inf([r.values[metric.key] for r in mine])
            summary[metric.key] = bootstrap_ci(values, np.median if metric.median else np.mean)
            if method != baseline:
                base = _finite_or_inf([r.values[metric.key] for r in results if r.spec.method == baseline])
                versus[metric.key] = compare(values, base, metric.higher_is_better)
        reached = sum(math.isfinite(r.values["steps_to_baseline"]) for r in mine)
        methods.append(MethodSummary(method, len(mine), summary, versus, reached))
    for metric in METRICS:  # Holm over the methods compared with the baseline, per metric
        family = [m for m in methods if metric.key in m.versus]
        for m, p in zip(family, holm([m.versus[metric.key].p_value for m in family])):
            m.versus[metric.key].p_holm = p
    return StudyResult(manifest, baseline, k, threshold, results, excluded, methods)


def _finite_or_inf(values: list[float]) -> list[float]:
    """Drop NaN (a metric a run cannot have, e.g. no evaluation); keep ∞ (never reached)."""
    return [v for v in values if not math.isnan(v)]


# ----------------------------------------------------------------------------- outputs
def write_report(study_dir: Path, baseline: str | None = None, tail: int = 5, min_count: int = 20) -> Path:
    """Analyse the study in ``study_dir`` and write every output; returns ``study.md``."""
    study_dir = Path(study_dir)
    result = analyse(StudyManifest.load(study_dir), baseline, tail)
    _write_csv(study_dir / "study.csv", result)
    _write_runs_csv(study_dir / "runs.csv", result)
    plot_curves(result, study_dir / "curves.png")
    plot_seeds(result, study_dir / "seeds.png")
    clouds = _token_clouds(result, study_dir, min_count)
    md = study_dir / "study.md"
    md.write_text(_markdown(result, clouds, tail, study_dir.resolve().name), encoding="utf-8")
    return md


def _fmt(v: float, digits: int = 3) -> str:
    if v is None or math.isnan(v):
        return "–"
    if math.isinf(v):
        return "never" if v > 0 else "-∞"
    return f"{v:.{digits}f}" if abs(v) < 1000 or digits == 0 else f"{v:.0f}"


def _fmt_interval(iv: Interval, digits: int = 3) -> str:
    return f"{_fmt(iv.value, digits)} [{_fmt(iv.low, digits)}, {_fmt(iv.high, digits)}]"


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "–"
    return f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}"


def _markdown(r: StudyResult, clouds: dict[str, Path], tail: int, title: str) -> str:
    m = r.manifest
    base = r.baseline
    k = f"avg@{r.k}" if r.k else "avg@k"
    lines = [f"# Credit-method study: {title}", "",
             f"- recipe `{m.recipe}`" + (f", warm start `{m.warm_start}`" if m.warm_start else "")
             + (f", overrides `{' '.join(m.overrides)}`" if m.overrides else ""),
             f"- methods: {', '.join(m.methods)}; seeds: {', '.join(map(str, m.seeds))} ({' '.join(m.seed_keys)}); "
             f"baseline: **{base}**; executor: {m.executor}",
             f"- finished runs: {len(r.results)} of {len(m.runs)}"
             + (f" (excluded: {', '.join(f'{s.name} ({state})' for s, state in r.excluded)})" if r.excluded else ""),
             f"- report written {time.strftime('%F %T')}; held-out metric {k}; final train reward = mean of the "
             f"last {tail} steps; baseline's final accuracy = {_fmt(r.threshold)}", "",
             "## Results", "",
             "Mean and 95 % bootstrap CI over seeds (steps to the baseline's final accuracy: median, "
             "\"never\" when a run did not get there; *reached* counts the runs that did).", "",
             f"| method | n | final held-out {k} | area under held-out curve | final train reward "
             "| steps to baseline's final acc | reached |", "|---|---|---|---|---|---|---|"]
    for s in r.methods:
        lines.append(f"| {s.method} | {s.n} | {_fmt_interval(s.summary['final_acc'])} | {_fmt_interval(s.summary['auc'])} "
                     f"| {_fmt_interval(s.summary['final_reward'])} | {_fmt_interval(s.summary['steps_to_baseline'], 0)} "
                     f"| {s.reached}/{s.n} |")
    family = len([s for s in r.methods if s.versus])
    lines += ["", f"## Versus {base}", "",
              f"One-sided Mann–Whitney U (H1: the method is better: higher accuracy / reward, fewer steps), "
              f"p Holm-adjusted over the {family} method(s) per metric; A = P(a run of the method beats a "
              "run of the baseline) + ½ P(tie) (0.5: no effect; 0.56 / 0.64 / 0.71: small / medium / large).", "",
              "| method | " + " | ".join(f"{mt.title}: p (Holm) / A" for mt in METRICS) + " |",
              "|---|" + "---|" * len(METRICS)]
    for s in r.methods:
        if not s.versus:
            continue
        cells = [f"{_fmt_p(s.versus[mt.key].p_value)} ({_fmt_p(s.versus[mt.key].p_holm)}) / "
                 f"{_fmt(s.versus[mt.key].effect_a, 2)}" for mt in METRICS]
        lines.append(f"| {s.method} | " + " | ".join(cells) + " |")
    lines += ["", "## Run time", "", "| method | runs | wall per run (mean) | CPU per run (mean) | CPU / wall |",
              "|---|---|---|---|---|"]
    for s in r.methods:
        mine = [x for x in r.results if x.spec.method == s.method]
        wall, cpu = np.nanmean([x.wall_s for x in mine]), np.nanmean([x.cpu_s for x in mine])
        lines.append(f"| {s.method} | {len(mine)} | {fmt_seconds(wall)} | {fmt_seconds(cpu)} | "
                     f"{_fmt(cpu / wall, 2) if wall and not math.isnan(wall) else '–'} |")
    lines += ["", "## Pictures", "", "![learning curves](curves.png)", "", "![every seed](seeds.png)", ""]
    for method, png in clouds.items():
        lines += [f"Token clouds of {method} (all seeds pooled; table: [{png.with_suffix('.md').name}]"
                  f"({png.with_suffix('.md').relative_to(png.parents[1])})):", "",
                  f"![token clouds {method}]({png.relative_to(png.parents[1])})", ""]
    lines += ["Files: `study.csv` (per method and metric), `runs.csv` (per run).", ""]
    return "\n".join(lines)


def _write_csv(path: Path, r: StudyResult) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["metric", "method", "n", "statistic", "value", "ci_low", "ci_high", "baseline", "p_value",
                    "p_holm", "vargha_delaney_a", "reached"])
        for s in r.methods:
            for mt in METRICS:
                iv, c = s.summary[mt.key], s.versus.get(mt.key)
                w.writerow([mt.key, s.method, s.n, "median" if mt.median else "mean", iv.value, iv.low, iv.high,
                            r.baseline if c else "", c.p_value if c else "", c.p_holm if c else "",
                            c.effect_a if c else "", s.reached if mt.key == "steps_to_baseline" else ""])


def _write_runs_csv(path: Path, r: StudyResult) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "seed", "state", *[mt.key for mt in METRICS], "wall_s", "cpu_s", "dir"])
        for x in r.results:
            w.writerow([x.spec.method, x.spec.seed, "done", *[x.values[mt.key] for mt in METRICS], x.wall_s,
                        x.cpu_s, x.spec.dir])
        for spec, state in r.excluded:
            w.writerow([spec.method, spec.seed, state, *[""] * len(METRICS), "", "", spec.dir])


# ----------------------------------------------------------------------------- pictures
def _band(x_lists: list[list[int]], y_lists: list[list[float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps common to every run, the mean over runs and a 95 % bootstrap band of the mean."""
    from scipy import stats

    common = sorted(set.intersection(*[set(x) for x in x_lists])) if x_lists else []
    if not common:
        return (np.array([]),) * 4
    ys = np.array([[dict(zip(x, y))[c] for c in common] for x, y in zip(x_lists, y_lists)])  # [runs, steps]
    mean = ys.mean(axis=0)
    if ys.shape[0] < 2:
        return np.array(common), mean, mean, mean
    with np.errstate(invalid="ignore"):
        ci = stats.bootstrap((ys,), np.mean, axis=0, confidence_level=0.95, n_resamples=2000,
                             method="percentile", rng=np.random.default_rng(0)).confidence_interval
    return np.array(common), mean, np.asarray(ci.low), np.asarray(ci.high)


def _smooth(y: list[float], window: int) -> list[float]:
    """Trailing moving average (the train reward is noisy step to step)."""
    out, acc = [], []
    for v in y:
        acc.append(v)
        acc = acc[-window:]
        out.append(sum(acc) / len(acc))
    return out


def plot_curves(r: StudyResult, out_png: Path, smooth: int = 5) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, s in enumerate(r.methods):
        mine = [x for x in r.results if x.spec.method == s.method]
        color = f"C{i}"
        for ax, xs, ys in ((axes[0], [x.eval_x for x in mine], [x.eval_y for x in mine]),
                           (axes[1], [x.reward_x for x in mine], [_smooth(x.reward_y, smooth) for x in mine])):
            steps, mean, low, high = _band([x for x in xs if x], [y for x, y in zip(xs, ys) if x])
            if len(steps):
                ax.plot(steps, mean, color=color, label=f"{s.method} (n={len(mine)})",
                        marker="o" if len(steps) < 15 else None, ms=3)
                ax.fill_between(steps, low, high, color=color, alpha=0.2, lw=0)
    if not math.isnan(r.threshold):
        axes[0].axhline(r.threshold, color="grey", ls="--", lw=0.8, label="baseline's final accuracy")
    axes[0].set_title(f"held-out avg@{r.k or 'k'} (mean over seeds, 95 % bootstrap band)")
    axes[1].set_title(f"train reward ({smooth}-step moving average; mean, 95 % band)")
    for ax in axes:
        ax.set_xlabel("RL steps trained")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def plot_seeds(r: StudyResult, out_png: Path) -> Path:
    """One panel per metric: every seed as a dot, the method's mean (median) and CI as a bar, Holm p
    against the baseline above each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4.2 * len(METRICS), 4.2))
    rng = np.random.default_rng(0)
    for ax, mt in zip(axes, METRICS):
        top = -math.inf
        for i, s in enumerate(r.methods):
            vals = [x.values[mt.key] for x in r.results if x.spec.method == s.method]
            finite = [v for v in vals if math.isfinite(v)]
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(finite)), finite, s=18, color=f"C{i}", alpha=0.8)
            never = len([v for v in vals if math.isinf(v)])
            iv = s.summary[mt.key]
            if math.isfinite(iv.value) and math.isfinite(iv.low) and math.isfinite(iv.high):
                ax.errorbar(i + 0.3, iv.value, yerr=[[iv.value - iv.low], [iv.high - iv.value]],
                            fmt="D", color="black", ms=4, capsize=3)
            top = max([top, *finite]) if finite else top
            label = f"p={_fmt_p(s.versus[mt.key].p_holm)}" if mt.key in s.versus else "baseline"
            if never:
                label += f"\n{never} never"
            ax.annotate(label, (i, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(r.methods)), [s.method for s in r.methods], rotation=30, ha="right", fontsize=8)
        ax.set_title(mt.title, fontsize=9, pad=22)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _token_clouds(r: StudyResult, study_dir: Path, min_count: int) -> dict[str, Path]:
    """Per DelTA run (in its directory) and per DelTA method over all its seeds (``token_clouds/``)."""
    from delta_megatron.viz import write_token_clouds

    out = {}
    for s in r.methods:
        if not is_delta(s.method):
            continue
        dirs = [x.spec.dir for x in r.results if x.spec.method == s.method]
        for d in dirs:
            write_token_clouds(d, min_count=min_count, title=f"{s.method}, {Path(d).name}")
        name = re.sub(r"[^A-Za-z0-9-]+", "-", s.method)
        written = write_token_clouds(dirs, study_dir / "token_clouds", min_count=min_count, name=name,
                                     title=f"{s.method}, {len(dirs)} seeds")
        if written:
            out[s.method] = written[0]
    return out
