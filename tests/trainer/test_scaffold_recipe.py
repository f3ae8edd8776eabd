"""The scaffolded-scratchpad recipe end to end on CPU: its warm start (SFT from scratch, HF export with
the 25-token vocabulary), then RL from that checkpoint with DelTA, whose per-token records use the
scaffold's word tokens."""

import json

import pytest

from delta_megatron.config import load_config
from delta_megatron.data.synthetic import SCAFFOLD_VOCAB
from delta_megatron.tracking import read_metrics
from delta_megatron.trainer import run
from pipelines.scaffold_arith_cpu import response_budget, smoke_config, smoke_warm_start


def test_response_budget_covers_the_longest_target():
    # 99+99: two steps "digit i: 9 plus 9 is 18(19), write 8(9) carry 1; " at share 0.6 + ">198" + EOS
    assert response_budget(2, 0.6) == 2 * (10 + 6) + 4 + 1


@pytest.mark.slow
def test_warm_start_then_rl(tmp_path):
    base = smoke_config(str(tmp_path), "delta", steps=2)
    overrides = smoke_warm_start(base, tmp_path / "warm_start")
    model_dir = tmp_path / "warm_start" / "sft_model"
    assert overrides == [f"model.hf_path={model_dir}", f"data.tokenizer={model_dir}"]
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    assert sorted(vocab, key=vocab.get) == list(SCAFFOLD_VOCAB)
    run(load_config(base=base, overrides=overrides + ["logging.progress=false"]))
    rows = read_metrics(tmp_path / "delta" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert all(r["rollout/response_len_mean"] > 0 for r in rows)
    records = [json.loads(line) for line in (tmp_path / "delta" / "credit_tokens.jsonl").read_text().splitlines()]
    assert {t for rec in records for t in rec["text"]} <= set(SCAFFOLD_VOCAB)
