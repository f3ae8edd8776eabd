"""RolloutBatch: packing, field contract, DP/micro-batch partitions and the CP split with its inverse."""

import random

import pytest
import torch

from delta_megatron.batch import RolloutBatch, balanced_partition, cp_gather, cp_split


def make_batch(seed=0, n=10):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 50) for _ in range(rng.randint(1, 6))] for _ in range(n)]
    responses = [[rng.randrange(3, 50) for _ in range(rng.randint(1, 12))] for _ in range(n)]
    batch = RolloutBatch.from_samples(prompts, responses, reward=torch.arange(n, dtype=torch.float32),
                                      group_id=torch.arange(n) // 2, text=[f"s{i}" for i in range(n)])
    batch.add_token_field("logp_old", -torch.arange(batch.num_tokens, dtype=torch.float32))
    return batch, prompts, responses


def test_packing_layout():
    batch = RolloutBatch.from_samples([[5, 6], [7]], [[8, 9, 2], [2]])
    assert batch.tokens.tolist() == [5, 6, 8, 9, 2, 7, 2]
    assert batch.cu_seqlens.tolist() == [0, 5, 7]
    assert batch.response_mask.tolist() == [False, False, True, True, True, False, True]
    assert batch.seq_index.tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert batch.positions.tolist() == [0, 1, 2, 3, 4, 0, 1]
    assert batch.response_lens.tolist() == [3, 1]
    assert batch.responses() == [[8, 9, 2], [2]]


def test_fields_are_add_only_and_shape_checked():
    batch, *_ = make_batch()
    with pytest.raises(KeyError, match="already set by an earlier stage"):
        batch.add_token_field("logp_old", torch.zeros(batch.num_tokens))
    with pytest.raises(ValueError, match="token field 'x' has 3 rows"):
        batch.add_token_field("x", torch.zeros(3))
    with pytest.raises(ValueError, match="sample field 'y' has 2 rows"):
        batch.add_sample_field("y", torch.zeros(2))
    assert batch.per_token("reward")[batch.cu_seqlens[3]] == 3.0


def test_select_then_concat_round_trip():
    batch, prompts, responses = make_batch()
    order = [7, 2, 9, 0, 4, 1, 8, 3, 6, 5]
    parts = [batch.select(order[:4]), batch.select(order[4:])]
    joined = RolloutBatch.concat(parts)
    back = joined.select([order.index(i) for i in range(10)])
    assert torch.equal(back.tokens, batch.tokens) and torch.equal(back.cu_seqlens, batch.cu_seqlens)
    assert torch.equal(back["logp_old"], batch["logp_old"]) and torch.equal(back["reward"], batch["reward"])
    assert back.sample_meta["text"] == batch.sample_meta["text"]
    assert parts[0].responses() == [responses[i] for i in order[:4]]


def test_dp_partition_balanced_and_complete():
    lengths = [random.Random(1).randint(1, 100) for _ in range(37)]
    parts = balanced_partition(lengths, 4)
    assert sorted(i for p in parts for i in p) == list(range(37))
    assert {len(p) for p in parts} <= {9, 10}
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(lengths)
    assert parts == balanced_partition(lengths, 4)  # deterministic


def test_micro_batches_respect_budget():
    batch, *_ = make_batch(seed=3, n=30)
    lens = batch.seq_lens.tolist()
    mbs = batch.micro_batches(max_tokens=24)
    assert sorted(i for mb in mbs for i in mb) == list(range(30))
    for mb in mbs:
        assert sum(lens[i] for i in mb) <= 24 or len(mb) == 1
    # lower bound on the number of bins: total tokens / budget
    assert len(mbs) >= -(-sum(lens) // 24)
    huge = batch.micro_batches(max_tokens=3)  # longer than budget → one sample per micro-batch
    assert all(len(mb) == 1 for mb in huge) and len(huge) == 30


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("pad_multiple", [1, 2])
def test_cp_split_load_balanced_and_invertible(cp, pad_multiple):
    batch, *_ = make_batch(seed=cp, n=6)
    shards = [cp_split(batch, cp, r, pad_multiple) for r in range(cp)]
    owned = torch.cat([s.token_index[s.valid] for s in shards])
    assert sorted(owned.tolist()) == list(range(batch.num_tokens))  # every token exactly once
    full = batch["logp_old"]
    locals_ = [s.take(full) for s in shards]
    assert torch.equal(cp_gather(batch, shards, locals_), full)
    # chunk structure for the first sequence: rank r holds chunks r and 2cp-1-r
    length = int(batch.seq_lens[0])
    unit = 2 * cp * pad_multiple
    chunk = -(-length // unit) * unit // (2 * cp)
    for r, s in enumerate(shards):
        first = s.token_index[: 2 * chunk].tolist()
        expect = [i if i < length else -1 for i in
                  list(range(r * chunk, (r + 1) * chunk)) + list(range((2 * cp - 1 - r) * chunk, (2 * cp - r) * chunk))]
        assert first == expect
