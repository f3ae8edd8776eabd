"""DAPO dynamic sampling inside the trainer: rounds of ``gen_batch_multiplier × prompts_per_step``
prompts, only groups with varying correctness kept, exactly ``prompts_per_step`` of them, the data
cursor moved past every generated prompt, and a clear error when the data gives too little signal."""

import pytest
import torch

from delta_megatron.config import load_config
from delta_megatron.parallel import destroy, init_distributed
from delta_megatron.trainer import Trainer
from pipelines.tiny_arith_cpu import smoke_config


def _trainer(tmp_path, overrides):
    cfg = load_config(base=smoke_config(str(tmp_path), "dapo", steps=1),
                      overrides=["checkpoint.every=0", "algo.dynamic_sampling.enabled=true"] + overrides)
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    return cfg, Trainer(cfg)


def test_keeps_exactly_the_target_number_of_informative_groups(tmp_path):
    # 1-digit sums, 16 samples: the random-init model is right on a few samples (~0.5 %), so a few
    # groups of each round are mixed and most are all-wrong
    cfg, trainer = _trainer(tmp_path, ["data.synthetic_digits=1", "rollout.n_samples=16",
                                       "algo.dynamic_sampling.gen_batch_multiplier=4", "train.prompts_per_step=2"])
    try:
        cursor0 = trainer.prompts.sampler.cursor
        batch = trainer.rollout(0)
        stats = trainer.rollout_stats
        history = trainer.fit()  # the full step runs on a filtered batch and logs the counters
    finally:
        destroy()
    groups = torch.unique(batch["group_id"])
    assert groups.numel() == 2 and batch.num_seqs == 2 * cfg.rollout.n_samples
    for g in groups:  # every kept group has both correct and wrong responses
        acc = batch["acc"][batch["group_id"] == g]
        assert 0 < float(acc.sum()) < acc.numel()
    rounds = stats["rollout/gen_rounds"]
    assert stats["rollout/prompts_generated"] == rounds * 4 * 2
    assert rounds >= 2  # this seed needs several rounds (4 here): kept groups accumulate across rounds
    assert trainer.prompts.sampler.cursor - cursor0 >= stats["rollout/prompts_generated"]  # + fit's step
    assert 0 < stats["rollout/informative_group_frac"] <= 1
    assert history[0]["rollout/num_samples"] == 2 * cfg.rollout.n_samples
    assert history[0]["rollout/gen_rounds"] >= 1


def test_no_signal_fails_after_max_gen_batches_with_a_clear_message(tmp_path):
    # 3-digit sums are beyond a random-init model: every group is all-wrong, nothing is informative
    _, trainer = _trainer(tmp_path, ["data.synthetic_digits=3", "algo.dynamic_sampling.max_gen_batches=2",
                                     "algo.dynamic_sampling.gen_batch_multiplier=1"])
    try:
        cursor0 = trainer.prompts.sampler.cursor
        with pytest.raises(RuntimeError, match=r"only 0 of 8 prompt groups .* after 2 rounds of 8 prompts"):
            trainer.rollout(0)
        assert trainer.prompts.sampler.cursor - cursor0 == 16
    finally:
        trainer.close()
        destroy()
