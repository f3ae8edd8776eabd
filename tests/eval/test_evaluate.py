"""evaluate() with a deterministic stub generator: exact per-benchmark and weighted numbers, reports."""

import csv
import io

import pytest

from delta_megatron.config import EvalConfig
from delta_megatron.data import Example, PromptDataset, load_dataset
from delta_megatron.eval import EvalSettings, evaluate, write_report
from delta_megatron.reward import ExactMatchReward, MathReward, RewardConfig
from delta_megatron.utils.configs import ConfigError

SAMPLES = {
    "a0": ["\\boxed{5}", "\\boxed{4}", "no answer", "\\boxed{6}"],            # 1 of 4 correct
    "a1": ["\\boxed{7}"] * 4,                                                 # 4 of 4
    "b0": ["\\boxed{1/2}", "\\boxed{\\frac{1}{2}}", "Answer: \\frac{1}{2}", "\\boxed{2}"],  # 2 exact
}
DATASETS = {
    "A": [Example("A/0", "a0", "5", "t"), Example("A/1", "a1", "7", "t")],
    "B": [Example("B/0", "b0", "\\frac{1}{2}", "t")],
}


class StubGenerator:
    """Returns the canned samples for each prompt and records every call."""

    def __init__(self, samples):
        self.samples, self.calls = samples, []

    def __call__(self, prompts, n, temperature, top_p, max_new_tokens):
        self.calls.append((list(prompts), n, temperature, top_p, max_new_tokens))
        return [self.samples[p][:n] for p in prompts]


@pytest.fixture
def results():
    gen = StubGenerator(SAMPLES)
    res = evaluate(gen, DATASETS, ExactMatchReward(),
                   EvalSettings(k=4, pass_ks=(2, 4), prompts_per_call=1))
    assert gen.calls == [(["a0"], 4, 1.0, 0.7, 30000), (["a1"], 4, 1.0, 0.7, 30000),
                         (["b0"], 4, 1.0, 0.7, 30000)]
    return res


def test_per_benchmark_numbers(results):
    a, b = results.benchmarks
    assert [(q.id, q.n, q.c) for q in a.questions] == [("A/0", 4, 1), ("A/1", 4, 4)]
    assert a.questions[0].rewards == [1.0, 0.0, 0.0, 0.0]
    # A: avg@4 = (1/4 + 4/4) / 2; pass@2 = (1 - C(3,2)/C(4,2) + 1) / 2 = (0.5 + 1) / 2
    assert a.metrics() == {"avg@4": 0.625, "pass@2": 0.75, "pass@4": 1.0}
    # B: c = 2 (exact match: "1/2" is not "\frac{1}{2}"); pass@2 = 1 - C(2,2)/C(4,2) = 5/6
    assert b.metrics() == pytest.approx({"avg@4": 0.5, "pass@2": 5 / 6, "pass@4": 1.0}, abs=1e-15)
    assert (b.reward_stats.total, b.reward_stats.correct, b.reward_stats.no_answer) == (4, 2, 0)
    assert (a.reward_stats.total, a.reward_stats.correct, a.reward_stats.no_answer) == (8, 5, 1)


def test_weighted_average_and_flat_metrics(results):
    # weights = question counts (2 and 1)
    assert results.weighted == pytest.approx(
        {"avg@4": (2 * 0.625 + 0.5) / 3, "pass@2": (2 * 0.75 + 5 / 6) / 3, "pass@4": 1.0}, abs=1e-15)
    flat = results.as_metrics()
    assert flat["eval/A/avg@4"] == 0.625 and flat["eval/avg/pass@4"] == 1.0
    assert sorted(flat) == sorted(f"eval/{b}/{m}" for b in ("A", "B", "avg")
                                  for m in ("avg@4", "pass@2", "pass@4"))


def test_markdown_and_csv(results, tmp_path):
    assert results.to_markdown() == (
        "| benchmark | questions | avg@4 | pass@2 | pass@4 |\n"
        "|---|---:|---:|---:|---:|\n"
        "| A | 2 | 62.50 | 75.00 | 100.00 |\n"
        "| B | 1 | 50.00 | 83.33 | 100.00 |\n"
        "| avg (weighted) | 3 | 58.33 | 77.78 | 100.00 |\n")
    rows = list(csv.reader(io.StringIO(results.to_csv())))
    assert rows[0] == ["benchmark", "questions", "avg@4", "pass@2", "pass@4"]
    assert [r[:2] for r in rows[1:]] == [["A", "2"], ["B", "1"], ["avg (weighted)", "3"]]
    assert [float(x) for x in rows[3][2:]] == pytest.approx([1.75 / 3, (1.5 + 5 / 6) / 3, 1.0], abs=1e-15)
    md, cs = write_report(results, tmp_path, stem="step10")
    assert md.read_text() == results.to_markdown() and cs.read_text() == results.to_csv()


def test_math_reward_dapo_on_real_rows():
    math500 = [ex for ex in load_dataset("math500") if ex.id == "math500/test/counting_and_probability/282.json"]
    aime24 = load_dataset("aime24", max_rows=1)
    assert (math500[0].answer, aime24[0].answer) == ("\\frac{1}{2}", "204")
    samples = {math500[0].problem: ["\\boxed{0.5}", "\\boxed{1/3}", "Answer: 1/2", "nothing"],
               aime24[0].problem: ["\\boxed{204}"] + ["\\boxed{240}"] * 3}
    with MathReward(RewardConfig(kind="math", variant="dapo", num_workers=1)) as reward:
        res = evaluate(StubGenerator(samples), [aime24, PromptDataset("math500", math500)], reward,
                       EvalSettings(k=4))
    got = {b.name: (b.questions[0].c, b.avg_at_k, b.pass_at_k) for b in res.benchmarks}
    assert got == {"aime24": (1, 0.25, {4: 1.0}), "math500": (2, 0.5, {4: 1.0})}
    assert res.benchmarks[1].questions[0].rewards == [1.0, -1.0, 1.0, -1.0]  # DAPO ±1; correct = > 0
    assert res.weighted == {"avg@4": 0.375, "pass@4": 1.0}


def test_settings_defaults_and_errors():
    s = EvalSettings()
    assert (s.k, s.temperature, s.top_p, s.ks) == (16, 1.0, 0.7, (16,))
    from_cfg = EvalSettings.from_config(EvalConfig())
    assert (from_cfg.k, from_cfg.top_p, from_cfg.max_new_tokens, from_cfg.max_prompts) == (16, 0.7, 32, None)
    with pytest.raises(ConfigError, match=r"^pass_ks: \(8,\)"):
        evaluate(StubGenerator(SAMPLES), DATASETS, ExactMatchReward(), EvalSettings(k=4, pass_ks=(8,)))
    with pytest.raises(ValueError, match="expected 4 per prompt"):
        evaluate(StubGenerator({k: v[:3] for k, v in SAMPLES.items()}), DATASETS, ExactMatchReward(),
                 EvalSettings(k=4))


def test_max_prompts_limits_each_benchmark():
    gen = StubGenerator(SAMPLES)
    res = evaluate(gen, DATASETS, ExactMatchReward(), EvalSettings(k=2, max_prompts=1))
    assert [b.n_questions for b in res.benchmarks] == [1, 1]
    assert [c[0] for c in gen.calls] == [["a0"], ["b0"]]
    assert res.benchmarks[0].metrics() == {"avg@2": 0.5, "pass@2": 1.0}


def test_compare_markdown_rows_per_decoding(results):
    from delta_megatron.eval import compare_markdown

    table = compare_markdown({"base": results, "extrapolate": results},
                             {"extrapolate": {"resampled %": 0.125, "changed %": 0.0625}})
    assert table.splitlines() == [
        "| decoding | benchmark | questions | avg@4 | pass@2 | pass@4 | resampled % | changed % |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        "| base | A | 2 | 62.50 | 75.00 | 100.00 | – | – |",
        "| base | B | 1 | 50.00 | 83.33 | 100.00 | – | – |",
        "| base | avg (weighted) | 3 | 58.33 | 77.78 | 100.00 | – | – |",
        "| extrapolate | A | 2 | 62.50 | 75.00 | 100.00 | 12.50 | 6.25 |",
        "| extrapolate | B | 1 | 50.00 | 83.33 | 100.00 | 12.50 | 6.25 |",
        "| extrapolate | avg (weighted) | 3 | 58.33 | 77.78 | 100.00 | 12.50 | 6.25 |"]
