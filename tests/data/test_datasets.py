"""Dataset loading of both schemas (shared {problem, answer} rows, verl jsonl/parquet) and templates."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from delta_megatron.data import (
    DatasetError,
    Example,
    arithmetic_tokenizer,
    encode_prompt,
    load_dataset,
    render_prompt,
    resolve_path,
)

REPO_DATA = Path(__file__).resolve().parents[2] / "data"  # the repo's copy of the shared data

VERL_ROWS = [
    {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "What is 1+1? Answer: $Answer"}],
     "ability": "MATH", "reward_model": {"style": "rule", "ground_truth": "2"},
     "extra_info": {"index": 17, "split": "train"}},
    {"data_source": "gsm8k", "prompt": "Compute 3*4.",
     "reward_model": {"style": "rule", "ground_truth": 12}, "extra_info": {"index": 18}},
    {"data_source": "math", "prompt": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "Half of 1?"}],
     "reward_model": {"ground_truth": "\\frac{1}{2}"}},
]
VERL_EXPECTED = [
    Example("verl/17", [{"role": "user", "content": "What is 1+1? Answer: $Answer"}], "2", "math_dapo"),
    Example("verl/18", "Compute 3*4.", "12", "gsm8k"),
    Example("verl/2", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Half of 1?"}],
            "\\frac{1}{2}", "math"),
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_shared_schema_rows():
    ds = load_dataset(REPO_DATA / "eval" / "aime24.jsonl")
    assert (ds.name, len(ds)) == ("aime24", 30)
    first = ds[0]
    assert (first.id, first.answer, first.source) == ("aime24/60", "204", "HuggingFaceH4/aime_2024")
    assert first.problem.startswith("Every morning Aya goes for a $9$-kilometer-long walk")
    assert first.messages is None


def test_repo_copy_resolves_by_short_name():
    assert resolve_path("aime24").as_posix().endswith("data/eval/aime24.jsonl")
    assert resolve_path("dapo_math_1k").as_posix().endswith("data/train/dapo_math_1k.jsonl")
    ds = load_dataset("math500", max_rows=3)
    assert [ex.id for ex in ds] == [
        "math500/test/precalculus/807.json", "math500/test/intermediate_algebra/1994.json",
        "math500/test/algebra/2584.json"]
    with pytest.raises(DatasetError, match="'aime99' not found"):
        load_dataset("aime99")


def test_verl_jsonl(tmp_path):
    ds = load_dataset(_write_jsonl(tmp_path / "verl.jsonl", VERL_ROWS))
    assert ds.examples == VERL_EXPECTED
    assert ds[0].problem == "What is 1+1? Answer: $Answer"
    assert ds[2].problem == "Half of 1?"


def test_verl_parquet(tmp_path):
    path = tmp_path / "verl.parquet"
    pq.write_table(pa.Table.from_pylist(VERL_ROWS[:1] + VERL_ROWS[2:]), path)
    ds = load_dataset(path)
    # parquet gives the second row extra_info=None, so its id falls back to the row index
    assert ds.examples == [VERL_EXPECTED[0], Example("verl/1", VERL_EXPECTED[2].prompt, "\\frac{1}{2}", "math")]


def test_simple_schema_parquet_and_json(tmp_path):
    rows = [{"id": "t/0", "problem": "p0", "answer": 5.0, "source": "s"},
            {"id": None, "problem": "p1", "answer": 27.5, "source": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "simple.parquet")
    (tmp_path / "simple.json").write_text(json.dumps(rows), encoding="utf-8")
    expected = [Example("t/0", "p0", "5", "s"), Example("simple/1", "p1", "27.5", "simple")]
    assert load_dataset(tmp_path / "simple.parquet").examples == expected
    assert load_dataset(tmp_path / "simple.json").examples == expected


@pytest.mark.parametrize("rows, message", [
    ([{"problem": "p"}], r"bad\.jsonl:1: no answer"),
    ([{"problem": "p", "answer": "1"}, {"problem": "q", "answer": "  "}], r"bad\.jsonl:2: empty answer"),
    ([{"answer": "1"}], r"bad\.jsonl:1: no prompt field"),
    ([{"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "1"}}], r"prompt\[0\]"),
    ([{"problem": "p", "answer": ["1", "2"]}], "lists of several acceptable answers"),
    ([{"id": "a", "problem": "p", "answer": "1"}, {"id": "a", "problem": "q", "answer": "2"}],
     "duplicate id 'a'"),
    ([], "no rows"),
])
def test_bad_rows_raise_with_location(tmp_path, rows, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DatasetError, match=message):
        load_dataset(path)


def test_bad_files(tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"problem": "p", "answer": "1"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"broken\.jsonl:2: not valid JSON"):
        load_dataset(tmp_path / "broken.jsonl")
    (tmp_path / "data.csv").write_text("problem,answer\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="unsupported file type '.csv'"):
        load_dataset(tmp_path / "data.csv")


def test_synthetic_spec():
    ds = load_dataset("synthetic:arith-reversed", max_rows=2)
    assert [(ex.id, ex.prompt, ex.answer, ex.source) for ex in ds] == [
        ("arith3-train/0", "564+532=", "1096", "synthetic:arith-reversed"),
        ("arith3-train/1", "193+664=", "857", "synthetic:arith-reversed")]
    with pytest.raises(ValueError, match="unknown synthetic dataset"):
        load_dataset("synthetic:mult")


QUESTION = Example("q/0", "What is $1+1$?", "2", "s")


def test_templates_plain_and_none():
    assert render_prompt(QUESTION, "none") == "What is $1+1$?"
    assert render_prompt(QUESTION, "plain") == (
        "User: What is $1+1$?\nPlease reason step by step, and put your final answer within \\boxed{}."
        "\n\nAssistant:")
    assert render_prompt(QUESTION, "plain", instruction=None) == "User: What is $1+1$?\n\nAssistant:"
    verl = VERL_EXPECTED[2]
    assert render_prompt(verl, "plain") == "System: Be brief.\n\nUser: Half of 1?\n\nAssistant:"
    assert render_prompt(verl, "none") == "Be brief.\n\nHalf of 1?"
    with pytest.raises(ValueError, match="template: 'fancy'"):
        render_prompt(QUESTION, "fancy")


def test_template_chat_uses_the_tokenizer_and_never_doubles_bos():
    tok = arithmetic_tokenizer()
    ex = Example("a/0", "12+34=", "46", "synthetic:arith-plain")
    text = render_prompt(ex, "chat", tok, instruction=None)
    assert text == "<bos>12+34="
    assert encode_prompt(tok, text, "chat") == [1, 4, 5, 13, 6, 7, 14]
    assert encode_prompt(tok, render_prompt(ex, "none"), "none") == [1, 4, 5, 13, 6, 7, 14]
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        render_prompt(QUESTION, "chat")
