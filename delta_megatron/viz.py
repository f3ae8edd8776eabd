"""Pictures of a run: training curves (one or several runs overlaid), the λ̄ distribution, an HTML
heat-map of per-token credit over sample responses, and token clouds (mean λ̄ per token over the run).
Inputs are the files a run writes (``metrics.jsonl``, ``samples.jsonl``, ``credit_tokens.jsonl``), so
plots can be re-made for any finished run.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from delta_megatron.tracking import read_metrics

CURVES = [
    ("rollout/reward_mean", "train reward"),
    ("eval/avg/avg@{k}", "held-out accuracy (avg@k)"),
    ("rollout/response_len_mean", "response length"),
    ("rollout/entropy_mean", "token entropy"),
    ("train/clip_frac", "clip fraction"),
    ("credit/delta/lambda_bar_std", "std of DelTA λ̄"),
]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_curves(runs: dict[str, str | Path], out_png: str | Path, eval_k: int = 4) -> Path:
    """One panel per metric, one line per run (``{label: run_dir}``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {label: read_metrics(Path(d) / "metrics.jsonl") for label, d in runs.items()}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (key, title) in zip(axes.flat, CURVES):
        key = key.format(k=eval_k)
        for label, rows in data.items():
            xs, ys = _series(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 15 else None, ms=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


HIST_EDGES = [0.5 + i * (1.0 / 40) for i in range(41)]  # the trainer's histc(bins=40, 0.5..1.5)


def lambda_histograms(run_dir: str | Path) -> list[tuple[str, int, list[float], list[float]]]:
    """The λ̄ histograms the distribution plot draws: (label, step, bin centres, fraction of tokens)
    for the first, middle and last recorded step (``samples.jsonl``, tokens with A ≠ 0)."""
    records = [r for r in _read_jsonl(Path(run_dir) / "samples.jsonl") if "credit_hist" in r]
    if not records:
        return []
    centers = [(a + b) / 2 for a, b in zip(HIST_EDGES[:-1], HIST_EDGES[1:])]
    out = []
    for rec, label in ((records[0], "first step"), (records[len(records) // 2], "middle"),
                       (records[-1], "last step")):
        total = sum(rec["credit_hist"]) or 1.0
        out.append((label, rec["step"], centers, [h / total for h in rec["credit_hist"]]))
    return out


def plot_lambda_distribution(run_dir: str | Path, out_png: str | Path) -> Path:
    """Histogram of λ̄ over non-zero-advantage tokens, early vs late in training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    hists = lambda_histograms(run_dir)
    for label, step, centers, fractions in hists:
        ax.plot(centers, fractions, label=f"{label} ({step})")
    if hists:
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.legend()
    ax.set_xlabel("λ̄ (DelTA token weight, mean 1 over the batch)")
    ax.set_ylabel("fraction of tokens")
    ax.set_title("Distribution of DelTA λ̄ over tokens with A ≠ 0")
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def lambda_heatmap_html(run_dir: str | Path, out_html: str | Path, steps: Sequence[int] | None = None,
                        per_step: int = 8) -> Path:
    """Sample responses with each token coloured by its credit (blue < 1 < red), grouped by step."""
    records = [r for r in _read_jsonl(Path(run_dir) / "samples.jsonl") if r["samples"]]
    if steps is not None:
        records = [r for r in records if r["step"] in set(steps)]
    elif len(records) > 3:
        records = [records[0], records[len(records) // 2], records[-1]]
    parts = ["<html><head><meta charset='utf-8'><title>DelTA λ̄ heat-map</title><style>",
             "body{font-family:monospace;margin:2em} .t{padding:2px 1px;margin:0 1px;border-radius:3px}",
             "td{padding:3px 8px} .pos{color:#060} .neg{color:#900}</style></head><body>",
             "<h2>Per-token DelTA weight λ̄ of sample responses</h2>",
             "<p>Red: λ̄ &gt; 1 (the token's gradient proxy sits with its own side's centroid, "
             "up-weighted); blue: λ̄ &lt; 1; white: 1. Tokens of responses with advantage 0 get "
             "λ_min (scaled). Hover a token for its value.</p>"]
    for rec in records:
        parts.append(f"<h3>step {rec['step']}</h3><table>")
        for s in rec["samples"][:per_step]:
            side = "pos" if s["advantage"] > 0 else "neg" if s["advantage"] < 0 else ""
            cells = []
            for tok, w in zip(s["tokens"], s["credit"] or [1.0] * len(s["tokens"])):
                cells.append(f"<span class='t' style='background:{_color(w)}' title='{w:.3f}'>"
                             f"{html.escape(tok) or '&#9633;'}</span>")
            parts.append(f"<tr><td class='{side}'>A={s['advantage']:+.2f}</td><td>R={s['reward']:.0f}</td>"
                         f"<td>{''.join(cells)}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    out = Path(out_html)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def _color(w: float, spread: float = 0.25) -> str:
    x = max(-1.0, min(1.0, (w - 1.0) / spread))
    if x >= 0:
        return f"rgb(255,{int(255 * (1 - x))},{int(255 * (1 - x))})"
    return f"rgb({int(255 * (1 + x))},{int(255 * (1 + x))},255)"


def _read_jsonl(path: Path) -> list[dict]:
    """The records of a jsonl file; a torn line (a run killed mid-write) is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# ----------------------------------------------------------------------------- token clouds
@dataclass
class TokenCredit:
    """One token's credit over a run: mean weight on tokens with A ≠ 0 (both sides) and per side."""

    token_id: int
    text: str
    count: int
    mean: float
    count_pos: int
    mean_pos: float
    count_neg: int
    mean_neg: float


def token_credit_table(run_dir: str | Path | Sequence[str | Path], min_count: int = 20) -> list[TokenCredit]:
    """Every token seen with A ≠ 0 at least ``min_count`` times over the run (``credit_tokens.jsonl``;
    several runs, e.g. the seeds of a study, add up), with its mean credit weight, highest first. A
    step recorded twice (a resumed run redoes the steps after its last checkpoint) counts once: the
    last record wins."""
    dirs = [run_dir] if isinstance(run_dir, (str, Path)) else list(run_dir)
    records = [rec for d in dirs for rec in {r["step"]: r for r in _read_jsonl(Path(d) / "credit_tokens.jsonl")}.values()]
    acc: dict[int, list] = {}  # id -> [text, Σpos, npos, Σneg, nneg]
    for rec in records:
        for tid, text, sums, counts in zip(rec["ids"], rec["text"], rec["sum"], rec["count"]):
            a = acc.setdefault(tid, [text, 0.0, 0, 0.0, 0])
            a[1] += sums[0]
            a[2] += counts[0]
            a[3] += sums[1]
            a[4] += counts[1]
    rows = []
    for tid, (text, sp, np_, sn, nn) in acc.items():
        n = np_ + nn
        if n >= max(min_count, 1):
            rows.append(TokenCredit(tid, text, n, (sp + sn) / n, np_, sp / np_ if np_ else float("nan"),
                                    nn, sn / nn if nn else float("nan")))
    return sorted(rows, key=lambda r: (-r.mean, r.token_id))


def _shown(text: str) -> str:
    """Whitespace made visible for labels and tables."""
    return text.replace(" ", "␣").replace("\n", "⏎").replace("|", "\\|") or "∅"


def write_token_clouds(run_dir: str | Path | Sequence[str | Path], out_dir: str | Path | None = None,
                       top: int = 15, min_count: int = 20, label: str = "λ̄", name: str = "token_clouds",
                       title: str | None = None) -> tuple[Path, Path] | None:
    """Token clouds as ranked bars: the ``top`` tokens with the highest and the lowest mean credit
    weight over the run (``token_clouds.png``) and the same as a table with counts and per-side means
    (``token_clouds.md``). Several run directories (a study's seeds) pool their tokens; ``out_dir``
    defaults to the (first) run's. None when no per-token weights were recorded (no credit method)."""
    rows = token_credit_table(run_dir, min_count)
    if not rows:
        return None
    first = Path(run_dir if isinstance(run_dir, (str, Path)) else run_dir[0])
    title = title or first.name
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir or first)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = min(top, len(rows))
    high, low = rows[:n], rows[::-1][:n]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.32 * n + 1.6))
    for ax, part, panel, color in ((axes[0], high, f"highest mean {label}", "#c0392b"),
                                   (axes[1], low, f"lowest mean {label}", "#2c6fbb")):
        ax.barh(range(len(part)), [r.mean for r in part], color=color)
        ax.set_yticks(range(len(part)), [f"{_shown(r.text)}  (n={r.count})" for r in part], fontsize=8)
        ax.invert_yaxis()
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        lo, hi = min(r.mean for r in part), max(r.mean for r in part)
        pad = max(0.02, 0.1 * (hi - lo))
        ax.set_xlim(min(lo, 1.0) - pad, max(hi, 1.0) + pad)
        ax.set_title(panel)
        ax.set_xlabel(f"mean {label} over the run (tokens with A ≠ 0)")
    fig.suptitle(f"Token clouds: {title} (tokens seen ≥ {min_count} times)")
    fig.tight_layout()
    png = out_dir / f"{name}.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    lines = [f"# Token clouds: {title}", "",
             f"Mean {label} per token over every recorded step (tokens with advantage ≠ 0, seen at least "
             f"{min_count} times; {len(rows)} such tokens).", ""]
    for heading, part in ((f"Highest mean {label}", high), (f"Lowest mean {label}", low)):
        lines += [f"## {heading}", "", f"| rank | token | mean {label} | count | mean on A>0 | n A>0 | mean on A<0 "
                  "| n A<0 |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {i + 1} | `{_shown(r.text)}` | {r.mean:.4f} | {r.count} | {r.mean_pos:.4f} | {r.count_pos} "
                  f"| {r.mean_neg:.4f} | {r.count_neg} |" for i, r in enumerate(part)]
        lines.append("")
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines), encoding="utf-8")
    return png, md
