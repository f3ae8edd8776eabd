"""``samples.jsonl`` rows carry the prompt and response ids next to λ̄, so a finished run's credit can
be re-scored against other models (``delta-megatron analyze dlogp``)."""

import json
from types import SimpleNamespace

import torch

from delta_megatron.batch import RolloutBatch
from delta_megatron.trainer import Trainer


def test_rows_hold_prompt_and_response_ids_with_their_credit(tmp_path):
    prompts, responses = [[1, 4, 13], [1, 5], [1, 6, 6, 14]], [[7, 2], [8, 9, 2], [10]]
    batch = RolloutBatch.from_samples(prompts, responses, advantage=torch.tensor([1.0, -1.0, 0.0]),
                                      reward=torch.tensor([1.0, 0.0, 0.0]))
    credit = torch.arange(batch.num_tokens, dtype=torch.float32) / 10
    batch.add_token_field("credit_weight", credit)
    adv = batch["advantage"][batch.seq_index] * batch.response_mask
    batch.add_token_field("advantage_tokens", adv)
    fake = SimpleNamespace(rank0=True, cfg=SimpleNamespace(logging=SimpleNamespace(log_every=1)), out=tmp_path,
                           decode_tokens=lambda ids: [str(i) for i in ids])
    Trainer.record_samples(fake, 3, batch, count=4)
    record = json.loads((tmp_path / "samples.jsonl").read_text())
    rows = {r["sample"]: r for r in record["samples"]}
    assert sorted(rows) == [0, 1]  # responses with A != 0
    for i, row in rows.items():
        assert row["prompt_ids"] == prompts[i] and row["response_ids"] == responses[i]
        start = int(batch.cu_seqlens[i]) + len(prompts[i])
        assert row["credit"] == credit[start:start + len(responses[i])].tolist()
