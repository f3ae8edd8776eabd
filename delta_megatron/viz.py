"""Pictures of a run: training curves (one or several runs overlaid), the λ̄ distribution, and an HTML
heat-map of per-token credit over sample responses. Inputs are the files a run writes
(``metrics.jsonl``, ``samples.jsonl``), so plots can be re-made for any finished run.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
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


def plot_lambda_distribution(run_dir: str | Path, out_png: str | Path) -> Path:
    """Histogram of λ̄ over non-zero-advantage tokens, early vs late in training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in _read_jsonl(Path(run_dir) / "samples.jsonl") if "credit_hist" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if records:
        edges = [0.5 + i * (1.0 / 40) for i in range(41)]
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        for rec, label in ((records[0], "first step"), (records[len(records) // 2], "middle"),
                           (records[-1], "last step")):
            total = sum(rec["credit_hist"]) or 1.0
            ax.plot(centers, [h / total for h in rec["credit_hist"]], label=f"{label} ({rec['step']})")
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("λ̄ (DelTA token weight, mean 1 over the batch)")
    ax.set_ylabel("fraction of tokens")
    ax.set_title("Distribution of DelTA λ̄ over tokens with A ≠ 0")
    ax.legend()
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
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
