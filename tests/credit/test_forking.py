"""Forking Tokens (baselines.md §7): top-20% entropy selection on the toy batch, normalisers, sharding."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from delta_megatron.credit.forking import ForkingConfig, ForkingCredit, num_selected, top_entropy_mask
from delta_megatron.utils.configs import ConfigError, validate
from tests.credit.toy_batch import toy_batch

# §7: (response, position) selected, by entropy: y4[1] 2.80, y2[1] 2.40, y8[2] 2.20, y1[2] 2.10,
# y5[1] 1.90, y3[1] 1.70; y7[0] at 1.50 is the first excluded.
SELECTED = {(3, 1), (1, 1), (7, 2), (0, 2), (4, 1), (2, 1)}


def selected_pairs(tb, mask: torch.Tensor) -> set[tuple[int, int]]:
    return {(r, j) for r, row in enumerate(tb.split(mask.double())) for j, v in enumerate(row) if v}


def loss_at_ratio_one(tb, mask: torch.Tensor, normaliser: float) -> float:
    """Token-mean DAPO loss at r = 1: −Σ mask·A / normaliser."""
    return float(-(mask.double() * tb.advantages).sum() / normaliser)


def test_toy_selection_and_losses():
    tb = toy_batch()
    assert num_selected(26, 0.2) == 6
    credit = ForkingCredit(ForkingConfig(rho=0.2))
    assert credit.per_microbatch and credit.needs.current_entropy
    out = credit.assign(tb.credit_inputs())
    assert out.target == "loss_mask" and out.values.dtype == torch.bool
    assert selected_pairs(tb, out.values) == SELECTED
    assert out.metrics["forking/num_selected"] == 6 and out.metrics["forking/num_valid_total"] == 26
    assert out.metrics["forking/entropy_threshold"] == pytest.approx(1.70, abs=1e-6)
    assert out.metrics["forking/normaliser"] == 6 == credit.normaliser(26)
    assert loss_at_ratio_one(tb, out.values, out.metrics["forking/normaliser"]) == pytest.approx(-0.166666, abs=1e-5)
    all_norm = ForkingCredit(ForkingConfig(normaliser="all"))
    out = all_norm.assign(tb.credit_inputs())
    assert out.metrics["forking/normaliser"] == 26 == all_norm.normaliser(26)
    assert loss_at_ratio_one(tb, out.values, out.metrics["forking/normaliser"]) == pytest.approx(-0.038461, abs=1e-5)


def test_masked_tokens_never_selected_and_k_counts_valid_only():
    tb = toy_batch()
    inputs = tb.credit_inputs()
    inputs.mask[tb.entropy > 2.0] = False  # drop the four top tokens (2.80, 2.40, 2.20, 2.10)
    out = ForkingCredit().assign(inputs)
    n = int(inputs.mask.sum())
    assert n == 22 and int(out.values.sum()) == num_selected(22, 0.2) == 5
    assert not bool((out.values & ~inputs.mask).any())
    # brute force: the 5 largest remaining entropies
    ent = torch.where(inputs.mask, tb.entropy, torch.tensor(-1.0, dtype=torch.float64))
    want = torch.zeros(26, dtype=torch.bool)
    want[torch.argsort(ent, descending=True, stable=True)[:5]] = True
    assert torch.equal(out.values, want)


@pytest.mark.parametrize("n,rho,k", [(0, 0.2, 0), (1, 0.2, 1), (5, 0.2, 1), (10, 0.2, 2), (11, 0.2, 3), (26, 0.5, 13)])
def test_num_selected_is_reference_ceil(n, rho, k):
    assert num_selected(n, rho) == k


def test_ties_are_deterministic():
    ent = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5])
    mask, k, n, thr = top_entropy_mask(ent, torch.ones(5, dtype=torch.bool), 0.4)
    assert (k, n, thr) == (2, 5, 2.0) and mask.tolist() == [False, True, True, False, False]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tb = toy_batch()
        inputs = tb.credit_inputs()
        cut = [0, 11, 26][rank: rank + 2]  # uneven CP-like shards of the same micro-batch
        for name in ("advantages", "mask", "seq_index", "token_ids", "logp", "entropy"):
            setattr(inputs, name, getattr(inputs, name)[cut[0]: cut[1]])
        out = ForkingCredit().assign(inputs, group=dist.group.WORLD)
        queue.put((rank, out.values.tolist(), out.metrics["forking/num_selected_total"]))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
def test_sharded_selection_equals_single_process():
    """Two gloo ranks holding shards of one micro-batch select exactly the single-process tokens."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_shard_worker, args=(2, _free_port(), queue), nprocs=2, join=True)
    results = dict((r, (v, k)) for r, v, k in (queue.get() for _ in range(2)))
    merged = torch.tensor(results[0][0] + results[1][0])
    tb = toy_batch()
    assert selected_pairs(tb, merged) == SELECTED
    assert results[0][1] == results[1][1] == 6


def test_config_validation():
    with pytest.raises(ConfigError, match="rho"):
        validate(ForkingConfig(rho=0.0))
    with pytest.raises(ConfigError, match="rho"):
        validate(ForkingConfig(rho=1.5))
    with pytest.raises(ConfigError, match="normaliser: 'some' — allowed: 'selected', 'all'"):
        ForkingConfig(normaliser="some")  # type: ignore[arg-type]
