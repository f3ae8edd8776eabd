"""Fault corpus, data: every malformed file is refused at load with the file and row named and what is
wrong; numeric answers that cannot be the intended gold (NaN, overflow, lost digits) included. Prompts
over ``rollout.max_prompt_len`` are dropped with a count and an example id, or fail naming the row."""

from __future__ import annotations

import json
import logging
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from delta_megatron.config import load_config
from delta_megatron.data import DatasetError, Example, PromptDataset, load_dataset
from delta_megatron.data.limits import limit_prompt_length
from delta_megatron.utils.configs import ConfigError

GOOD = {"problem": "1+1?", "answer": "2"}


def _jsonl(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


def _good_parquet(path, rows=None):
    pq.write_table(pa.Table.from_pylist(rows or [GOOD, {"problem": "2+2?", "answer": "4"}]), path)


def _truncated_parquet(path):
    _good_parquet(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# name -> (file name, bytes or a writer, regex the message must match after the path)
MALFORMED = {
    "non-UTF-8 jsonl": ("d.jsonl", _jsonl(json.dumps(GOOD), json.dumps(GOOD)) + b'{"problem": "caf\xe9"}\n',
                        r":3: not valid UTF-8 \(byte 0xe9 at column 17\)"),
    "non-UTF-8 json": ("d.json", b'[\n{"problem": "a", "answer": "1"},\n{"problem": "\xff"}]',
                       r":3: not valid UTF-8 \(byte 0xff"),
    "invalid JSON line": ("d.jsonl", _jsonl(json.dumps(GOOD), '{"problem": "x", "answer": '),
                          r":2: not valid JSON"),
    "json that is not a list": ("d.json", json.dumps(GOOD).encode(), r": a \.json dataset must hold a list"),
    "garbage parquet": ("d.parquet", b"PAR1 this is not parquet at all PAR1",
                        r": not a readable parquet file \("),
    "truncated parquet": ("d.parquet", _truncated_parquet, r": not a readable parquet file \("),
    "NaN answer": ("d.jsonl", _jsonl('{"problem": "x", "answer": NaN}'), r":1: answer nan is not a finite"),
    "overflowing answer": ("d.jsonl", _jsonl('{"problem": "x", "answer": 1e400}'),
                           r":1: answer 1e400 is not a finite number \(it overflows a float\)"),
    "-Infinity answer": ("d.jsonl", _jsonl(json.dumps(GOOD), '{"problem": "x", "answer": -Infinity}'),
                         r":2: answer -inf is not a finite"),
    "20-digit float answer": ("d.jsonl", _jsonl('{"problem": "x", "answer": 12345678901234567890.5}'),
                              r":1: answer 12345678901234567890.5 has more digits than a float holds "
                              r"\(it would become 1.2345678901234567e\+19\)"),
    "20-digit float ground truth": ("d.jsonl", _jsonl('{"prompt": "x", "reward_model": {"ground_truth": '
                                                      '0.12345678901234567890123}}'),
                                    r":1: answer 0.12345678901234567890123 has more digits"),
    "big integer stored as double": ("d.parquet", lambda p: _good_parquet(p, [{"problem": "x", "answer": 1e20}]),
                                     r":row 0: answer 1e\+20 is an integer beyond 2\*\*53 stored as a float"),
    "NaN in parquet": ("d.parquet", lambda p: _good_parquet(p, [{"problem": "y", "answer": 1.5},
                                                                  {"problem": "x", "answer": float("nan")}]),
                       r":row 1: answer nan is not a finite number"),
    "null answer": ("d.jsonl", _jsonl('{"problem": "x", "answer": null}'), r":1: answer None is not"),
    "boolean answer": ("d.jsonl", _jsonl('{"problem": "x", "answer": true}'), r":1: answer True is not"),
    "empty answer": ("d.jsonl", _jsonl('{"problem": "x", "answer": "  "}'), r":1: empty answer"),
    "several answers": ("d.jsonl", _jsonl('{"problem": "x", "answer": ["1", "2"]}'),
                        r":1: answer \['1', '2'\] is not a string or number"),
    "no prompt": ("d.jsonl", _jsonl('{"answer": "1"}'), r":1: no prompt field"),
    "empty prompt": ("d.jsonl", _jsonl('{"problem": "", "answer": "1"}'), r":1: empty prompt"),
    "bad chat message": ("d.jsonl", _jsonl('{"prompt": [{"role": "user"}], "answer": "1"}'),
                         r":1: prompt\[0\] = .* is not a"),
    "row not an object": ("d.jsonl", _jsonl("[1, 2]"), r":1: a row must be a JSON object, got list"),
    "no rows": ("d.jsonl", b"\n\n", r": no rows"),
    "duplicate ids": ("d.jsonl", _jsonl('{"id": "a", "problem": "x", "answer": "1"}',
                                        '{"id": "a", "problem": "y", "answer": "2"}'),
                      r": duplicate id 'a' \(rows 0 and 1\)"),
    "unsupported type": ("d.csv", b"problem,answer\n", r": unsupported file type '.csv'"),
}


@pytest.mark.parametrize("fname,content,message", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_file_names_file_and_row(tmp_path, fname, content, message):
    path = tmp_path / fname
    content(path) if callable(content) else path.write_bytes(content)
    with pytest.raises(DatasetError) as err:
        load_dataset(path)
    assert re.match(re.escape(str(path)) + message, str(err.value)), str(err.value)


@pytest.mark.parametrize("raw,gold", [("0.1", "0.1"), ("3.0", "3"), ("2.5e-3", "0.0025"), ("-7", "-7"),
                                      ("12345678901234567890", "12345678901234567890"), ("1.50", "1.5"),
                                      ('"NaN"', "NaN"), ("1e23", "100000000000000000000000")])
def test_numeric_answers_that_survive(tmp_path, raw, gold):
    path = tmp_path / "ok.jsonl"
    path.write_text('{"problem": "x", "answer": ' + raw + "}\n")
    assert load_dataset(path)[0].answer == gold


def test_utf8_bom_and_origin(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + _jsonl(json.dumps(GOOD), json.dumps({"problem": "é", "answer": "3"})))
    ds = load_dataset(path)
    assert [ex.answer for ex in ds] == ["2", "3"] and ds[1].problem == "é"
    assert ds[1].origin == f"{path}:2"
    assert ds[1] == Example(ds[1].id, "é", "3", ds[1].source)  # origin takes no part in equality


# ---------------------------------------------------------------- prompt length
def _dataset(tmp_path, lengths):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "problem": "x" * n, "answer": "1"}) + "\n"
                            for i, n in enumerate(lengths)))
    return load_dataset(path), path


def _chars(ex):  # one token per character, plus a BOS
    return [0] * (len(ex.problem) + 1)


def test_long_prompts_dropped_with_count_and_example(tmp_path, caplog):
    ds, path = _dataset(tmp_path, [3, 200, 5, 1_000_000, 9])
    with caplog.at_level(logging.WARNING, logger="delta_megatron.data.limits"):
        kept = limit_prompt_length(ds, _chars, max_len=10)
    assert [ex.id for ex in kept] == ["q0", "q2", "q4"]  # a prompt of exactly max_len tokens stays
    assert (kept.dropped, kept.dropped_ids) == (2, ["q1", "q3"])
    assert f"{path}: dropped 2 of 5 prompts longer than rollout.max_prompt_len=10 tokens " \
           "(e.g. 'q1': 201 tokens)" in caplog.text
    same = limit_prompt_length(ds, _chars, max_len=1_000_001)
    assert same is ds and same.dropped == 0


def test_long_prompt_fails_naming_file_and_row_by_switch(tmp_path):
    ds, path = _dataset(tmp_path, [3, 5, 200])
    with pytest.raises(DatasetError, match=re.escape(f"{path}:3: prompt of example 'q2' is 201 tokens, "
                                                     "longer than rollout.max_prompt_len=10")):
        limit_prompt_length(ds, _chars, max_len=10, on_long="fail")


def test_every_prompt_too_long_is_an_error():
    ds = PromptDataset("syn", [Example("a", "x" * 50, "1", "s")])
    with pytest.raises(DatasetError, match=r"syn: every one of the 1 prompts is longer than "
                                           r"rollout.max_prompt_len=10 tokens \(e.g. 'a': 51 tokens\)"):
        limit_prompt_length(ds, _chars, max_len=10)


def test_run_config_limits_prompts_with_the_run_template(tmp_path):
    from delta_megatron import builders
    from pipelines.tiny_arith_cpu import smoke_config

    cfg = load_config(base=smoke_config(str(tmp_path)), overrides=["data.synthetic_digits=3"])
    tokenizer, _ = builders.build_tokenizer(cfg, tmp_path)
    encode = builders.prompt_encoder(cfg, tokenizer)
    longest = max(len(encode(ex)) for ex in builders.build_datasets(cfg)[0])
    train, _ = builders.build_datasets(cfg, encode)
    assert train.dropped == 0 and longest <= cfg.rollout.max_prompt_len
    tight = load_config(base=cfg, overrides=[f"rollout.max_prompt_len={longest - 1}"])
    with pytest.raises(DatasetError, match=rf"every one of the \d+ prompts is longer than "
                                           rf"rollout.max_prompt_len={longest - 1}"):
        builders.build_datasets(tight, encode)


@pytest.mark.parametrize("override,message", [
    ("rollout.max_new_tokens=49", "rollout.max_new_tokens: 49 — rollout.max_prompt_len=16 + rollout.max_new"),
    ("eval.max_new_tokens=49", "eval.max_new_tokens: 49 — rollout.max_prompt_len=16 + eval.max_new"),
    ("rollout.max_prompt_len=59", "rollout.max_new_tokens: 6 — rollout.max_prompt_len=59 + rollout.max_new"),
])
def test_prompt_plus_response_must_fit_the_context(tmp_path, override, message):
    from pipelines.tiny_arith_cpu import smoke_config

    with pytest.raises(ConfigError, match=re.escape(message) + r".* must be <= model.max_position_embeddings=64"):
        load_config(base=smoke_config(str(tmp_path)), overrides=[override])
    load_config(base=smoke_config(str(tmp_path)), overrides=["rollout.max_new_tokens=48"])  # 16 + 48 fits


def test_max_prompt_len_must_be_positive():
    with pytest.raises(ConfigError, match=r"rollout.max_prompt_len: 0 — must be >= 1"):
        load_config(overrides=["rollout.max_prompt_len=0"])
    with pytest.raises(ConfigError, match=r"rollout.long_prompts: 'skip' — allowed: 'drop', 'fail'"):
        load_config(overrides=["rollout.long_prompts=skip"])
