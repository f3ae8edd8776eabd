"""The step's data flow (dataflow.py) in one process: the same batch and counters as the single-process
path it replaces (dynamic sampling included), the shard assignment, the packed transfer format, the
layout-invariant global token index and the eval merge. Multi-rank runs: tests/trainer/test_tp2_e2e.py
(DP 2 equals one process) and the cluster tests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from delta_megatron.algo.dynamic_sampling import DynamicSamplingConfig, collect_informative_groups
from delta_megatron.batch import RolloutBatch
from delta_megatron.dataflow import DataFlow, GroupMeta, _pack, _unpack
from delta_megatron.reward.verifier_pool import VerifyStats

ONE = SimpleNamespace(dp_rank=0, tp_rank=0, pp_rank=0, cp_rank=0, dp_size=1)


def _flow(dp: int = 1, mini_batches: int = 2) -> DataFlow:
    flow = DataFlow(ONE, producer=True, mini_batches=mini_batches, device=torch.device("cpu"))
    flow.dp = dp
    return flow


def _groups_batch(first: int, count: int, n: int = 3, seed: int = 0) -> RolloutBatch:
    """``count`` prompt groups of ``n`` samples; correctness varies in every other group."""
    gen = torch.Generator().manual_seed(seed + first)
    prompts, responses, gids, acc = [], [], [], []
    for g in range(first, first + count):
        for j in range(n):
            prompts.append(torch.randint(3, 9, (1 + g % 3,), generator=gen).tolist())
            responses.append(torch.randint(3, 9, (1 + (g + j) % 4,), generator=gen).tolist())
            gids.append(g)
            acc.append(float(j == 0) if g % 2 == 0 else 1.0)
    batch = RolloutBatch.from_samples(prompts, responses, group_id=torch.tensor(gids),
                                      truncated=torch.tensor([j % 2 == 1 for j in range(len(gids))]))
    batch.add_sample_field("acc", torch.tensor(acc))
    batch.add_sample_field("acc_reward", torch.tensor(acc) * 2 - 1)
    batch.add_token_field("logp_rollout", -torch.rand(batch.num_tokens, generator=gen))
    batch.sample_meta["verifier_stats"] = [VerifyStats(total=batch.num_seqs, correct=int(sum(acc)))] * batch.num_seqs
    return batch


def test_pack_round_trip_is_exact():
    batch = _groups_batch(0, 3)
    metas = _flow()._metas(batch)
    assert [(m.group, m.samples) for m in metas] == [(0, 3), (1, 3), (2, 3)]
    back = _unpack(_pack(batch), metas)
    assert torch.equal(back.tokens, batch.tokens) and torch.equal(back.cu_seqlens, batch.cu_seqlens)
    assert torch.equal(back.prompt_lens, batch.prompt_lens)
    for name in ("logp_rollout", "group_id", "truncated", "acc_reward", "acc"):
        assert back[name].dtype == batch[name].dtype and torch.equal(back[name], batch[name]), name


@pytest.mark.parametrize("dynamic", [False, True])
def test_one_process_gives_the_single_process_batch(dynamic):
    want = 4
    cfg = DynamicSamplingConfig(enabled=dynamic, gen_batch_multiplier=2, max_gen_batches=5)
    cursor = [0]

    def draw(n):
        cursor[0] += n
        return list(range(cursor[0] - n, cursor[0]))

    def produce(examples, first, round_first):
        assert examples == list(range(first, first + len(examples)))  # prompt i ↔ group i
        return _groups_batch(first, len(examples))

    batch, stats = _flow().collect(draw, produce, want, cfg)
    per_round = want * 2 if dynamic else want
    if dynamic:
        ref, ref_stats = collect_informative_groups(lambda r, n: _groups_batch(r * n, n), want, cfg)
        assert stats["rollout/gen_rounds"] == ref_stats["rollout/gen_rounds"] == 1
        assert stats["rollout/informative_group_frac"] == ref_stats["rollout/informative_group_frac"] == 0.5
    else:
        ref = _groups_batch(0, want)
    assert cursor[0] == per_round
    assert torch.equal(batch.tokens, ref.tokens) and torch.equal(batch["group_id"], ref["group_id"])
    assert torch.equal(batch["logp_rollout"], ref["logp_rollout"])
    assert batch["minibatch"].tolist() == [0] * 6 + [1] * 6  # two groups of 3 per mini-batch
    assert torch.equal(batch["global_token_index"], torch.arange(batch.num_tokens))
    assert stats["reward/total"] == per_round * 3  # summed over the round's verifier calls


def test_assignment_keeps_groups_whole_per_replica_and_minibatch():
    chosen = [GroupMeta(g, 0, 4, 10) for g in (3, 5, 8, 9, 12, 13, 20, 21)]
    assert _flow(dp=2, mini_batches=2).assignment(chosen) == {
        3: (0, 0), 5: (0, 0), 8: (1, 0), 9: (1, 0), 12: (0, 1), 13: (0, 1), 20: (1, 1), 21: (1, 1)}
    with pytest.raises(RuntimeError, match=r"mini-batch 0 has 2 prompt group\(s\) for 4 data-parallel replicas"):
        _flow(dp=4, mini_batches=2).assignment(chosen[:4])


def test_global_token_index_is_the_place_in_the_whole_step():
    chosen = [GroupMeta(0, 0, 2, 7), GroupMeta(1, 0, 2, 5), GroupMeta(2, 0, 1, 4)]
    shard = RolloutBatch.from_samples([[1], [1, 2]], [[3, 4, 5], [6]], group_id=torch.tensor([1, 1]))
    # group 1 starts after group 0's 7 tokens; its samples follow each other
    idx = DataFlow._global_index(shard, chosen)
    assert idx.tolist() == list(range(7, 7 + shard.num_tokens))


def test_eval_merge_equals_one_evaluation():
    from delta_megatron.eval.evaluate import EvalSettings, evaluate

    data = [SimpleNamespace(id=f"q{i}", answer=str(i % 3), problem=str(i)) for i in range(7)]
    settings = EvalSettings(k=2, max_new_tokens=4, prompts_per_call=3)

    def generate(examples, n, temperature, top_p, max_new_tokens):
        return [[str((int(ex.id[1:]) + j) % 3) for j in range(n)] for ex in examples]

    class Reward:
        def score(self, pairs):
            return [1.0 if a == b else 0.0 for a, b in pairs], VerifyStats(total=len(pairs))

    class Set(list):
        name = "toy"

    flow = _flow()
    merged = flow.evaluate(lambda: generate, [Set(data)], Reward(), settings)
    direct = evaluate(generate, {"toy": data}, Reward(), settings, prompt_fn=lambda ex: ex)
    assert merged.as_metrics() == direct.as_metrics()
    assert [q.c for q in merged.benchmarks[0].questions] == [q.c for q in direct.benchmarks[0].questions]
