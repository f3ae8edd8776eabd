"""The pictures of a run: λ̄ histogram, heat-map and token clouds — files written, and the values they
show equal the run's records (hand-made records with hand-computed numbers, then one real DelTA run
whose per-token sums must add up to its logged DelTA counts and normaliser)."""

import json
import math
import re
from pathlib import Path

import pytest

from delta_megatron.viz import (
    HIST_EDGES,
    lambda_heatmap_html,
    lambda_histograms,
    plot_lambda_distribution,
    token_credit_table,
    write_token_clouds,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _hist(values: dict[int, float]) -> list[float]:
    h = [0.0] * 40
    for i, v in values.items():
        h[i] = v
    return h


@pytest.fixture
def run_dir(tmp_path):
    samples = [
        {"step": 0, "credit_hist": _hist({10: 3.0, 30: 1.0}), "samples": [
            {"sample": 0, "advantage": 0.5, "reward": 1.0, "tokens": ["1", "2", "<eos>"], "credit": [1.0, 1.25, 0.75]},
            {"sample": 1, "advantage": -0.5, "reward": 0.0, "tokens": ["9", "<eos>"], "credit": [0.9, 1.1]}]},
        {"step": 2, "credit_hist": _hist({20: 2.0}), "samples": []},
        {"step": 4, "credit_hist": _hist({0: 1.0, 39: 1.0}), "samples": [
            {"sample": 3, "advantage": 1.0, "reward": 1.0, "tokens": ["<b>"], "credit": [1.0]}]},
    ]
    _write_jsonl(tmp_path / "samples.jsonl", samples)
    # ids 5 ("2"), 7 ("4"), 9 (" "); sums/counts per side [pos, neg, zero]
    tokens = [
        {"step": 0, "ids": [5, 7, 9], "text": ["2", "4", " "],
         "sum": [[2.4, 0.0, 0.8], [0.0, 1.8, 0.0], [1.0, 1.0, 5.0]], "count": [[2, 0, 1], [0, 2, 0], [1, 1, 6]]},
        {"step": 1, "ids": [5, 9], "text": ["2", " "],   # superseded by the resumed run's step 1 below
         "sum": [[100.0, 0.0, 0.0], [0.0, 0.0, 0.0]], "count": [[1, 0, 0], [0, 0, 0]]},
        {"step": 1, "ids": [5, 9], "text": ["2", " "],
         "sum": [[1.3, 0.9, 0.0], [0.0, 2.0, 0.0]], "count": [[1, 1, 0], [0, 2, 0]]},
    ]
    _write_jsonl(tmp_path / "credit_tokens.jsonl", tokens)
    return tmp_path


def test_lambda_histograms_are_the_recorded_fractions(run_dir):
    hists = lambda_histograms(run_dir)
    assert [(label, step) for label, step, _, _ in hists] == [("first step", 0), ("middle", 2), ("last step", 4)]
    _, _, centers, first = hists[0]
    assert centers[10] == pytest.approx((HIST_EDGES[10] + HIST_EDGES[11]) / 2) == pytest.approx(0.7625)
    assert first[10] == pytest.approx(0.75) and first[30] == pytest.approx(0.25) and sum(first) == pytest.approx(1)
    assert hists[1][3][20] == 1.0 and hists[2][3][0] == hists[2][3][39] == 0.5
    png = plot_lambda_distribution(run_dir, run_dir / "dist.png")
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000


def test_heatmap_shows_every_recorded_weight(run_dir):
    path = lambda_heatmap_html(run_dir, run_dir / "heat.html")
    text = path.read_text(encoding="utf-8")
    titles = [float(t) for t in re.findall(r"title='([0-9.]+)'", text)]
    assert titles == [1.0, 1.25, 0.75, 0.9, 1.1, 1.0]  # steps 0 and 4 (step 2 recorded no responses)
    assert "background:rgb(255,255,255)' title='1.000'>1<" in text       # λ̄ = 1: white
    assert "background:rgb(255,0,0)' title='1.250'>2<" in text           # +0.25 = full red
    assert "background:rgb(0,0,255)' title='0.750'>&lt;eos&gt;<" in text  # −0.25 = full blue, escaped
    assert "A=+0.50" in text and "A=-0.50" in text and "&lt;b&gt;" in text
    assert [int(s) for s in re.findall(r"<h3>step (\d+)</h3>", text)] == [0, 4]


def test_token_credit_table_means_and_filter(run_dir):
    rows = {r.text: r for r in token_credit_table(run_dir, min_count=1)}
    # "2": step 0 pos 2.4/2, step 1 (last record) pos 1.3/1 + neg 0.9/1; zero-side tokens are left out
    two = rows["2"]
    assert (two.count, two.count_pos, two.count_neg) == (4, 3, 1)
    assert two.mean == pytest.approx((2.4 + 1.3 + 0.9) / 4)
    assert two.mean_pos == pytest.approx(3.7 / 3) and two.mean_neg == pytest.approx(0.9)
    space = rows[" "]
    assert (space.count, space.mean) == (4, pytest.approx(4.0 / 4))
    four = rows["4"]
    assert four.count == 2 and four.mean == pytest.approx(0.9) and math.isnan(four.mean_pos)
    assert [r.text for r in token_credit_table(run_dir, min_count=1)] == ["2", " ", "4"]  # highest first
    assert [r.text for r in token_credit_table(run_dir, min_count=3)] == ["2", " "]


def test_token_clouds_files(run_dir, tmp_path):
    png, md = write_token_clouds(run_dir, tmp_path / "out", top=2, min_count=1)
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    text = md.read_text(encoding="utf-8")
    assert text.startswith(f"# Token clouds: {run_dir.name}\n")
    high = text.split("## Lowest")[0]
    low = text.split("## Lowest")[1]
    assert "| 1 | `2` | 1.1500 | 4 | 1.2333 | 3 | 0.9000 | 1 |" in high
    assert "| 2 | `␣` | 1.0000 | 4 |" in high and "`4`" not in high
    assert "| 1 | `4` | 0.9000 | 2 | nan | 0 | 0.9000 | 2 |" in low
    assert write_token_clouds(tmp_path / "empty") is None  # no per-token weights recorded: nothing


@pytest.mark.slow
def test_a_delta_run_records_what_its_metrics_say(tmp_path):
    """A real 2-step DelTA run: per step, the token sums count exactly DelTA's n_pos / n_neg / n_zero
    tokens, their weights add up to n_tok · mean λ̄, the histogram holds the A ≠ 0 tokens, and the
    token-cloud table is the mean over the steps."""
    from delta_megatron.config import load_config
    from delta_megatron.tracking import read_metrics
    from delta_megatron.trainer import run
    from pipelines.tiny_arith_cpu import smoke_config

    cfg = load_config(base=smoke_config(str(tmp_path), "delta", steps=2),
                      overrides=["data.synthetic_digits=1", "logging.progress=false"])  # both signs occur
    run(cfg)
    out = tmp_path / "delta"
    metrics = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    records = [json.loads(line) for line in (out / "credit_tokens.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    signs = []
    for rec, sample in zip(records, samples):
        m = metrics[rec["step"]]
        counts = [sum(c[i] for c in rec["count"]) for i in range(3)]
        assert counts == [m["credit/delta/n_pos"], m["credit/delta/n_neg"], m["credit/delta/n_zero"]]
        signs.append(counts[0] > 0 and counts[1] > 0)
        total = sum(sum(s) for s in rec["sum"])
        assert total == pytest.approx(sum(counts) * m["credit/delta/lambda_bar_mean"], rel=1e-5)
        assert sum(sample["credit_hist"]) == counts[0] + counts[1]
    assert any(signs)  # the fixed seed gives both sides, so λ̄ is not trivially 1
    table = {r.token_id: r for r in token_credit_table(out, min_count=1)}
    for tid in table:
        s = sum(rec["sum"][rec["ids"].index(tid)][k] for rec in records if tid in rec["ids"] for k in (0, 1))
        n = sum(rec["count"][rec["ids"].index(tid)][k] for rec in records if tid in rec["ids"] for k in (0, 1))
        assert table[tid].count == n and table[tid].mean == pytest.approx(s / n)
    png, md = write_token_clouds(out, min_count=1)
    assert png.exists() and md.exists()
