"""Deterministic epoch shuffling and exact resume of the remaining order."""

import pytest

from delta_megatron.data import EpochSampler, PromptStream

# Pinned: the order is a pure function of (seed, epoch, num_items); a change here changes every run.
SEED0_EPOCH0 = [1, 4, 5, 2, 8, 0, 3, 9, 7, 6]


def test_orders_are_pinned_permutations_that_differ_per_epoch():
    s = EpochSampler(10, seed=0)
    assert s.order(0) == SEED0_EPOCH0
    orders = [s.order(e) for e in range(4)]
    assert all(sorted(o) == list(range(10)) for o in orders)
    assert len({tuple(o) for o in orders}) == 4
    assert EpochSampler(10, seed=1).order(0) != SEED0_EPOCH0
    assert EpochSampler(10, seed=0, shuffle=False).order(3) == list(range(10))


def test_batches_cross_epochs_without_loss_or_repeats():
    s = EpochSampler(10, seed=0)
    first = s.next(4) + s.next(4) + s.next(4)
    assert first[:10] == SEED0_EPOCH0
    assert first[10:] == s.order(1)[:2]
    assert (s.epoch, s.cursor, s.consumed) == (1, 2, 12)


def test_resume_mid_epoch_yields_exactly_the_remaining_order():
    reference = EpochSampler(10, seed=7)
    ref_batches = [reference.next(3) for _ in range(9)]  # 27 indices: into the third epoch

    interrupted = EpochSampler(10, seed=7)
    head = [interrupted.next(3) for _ in range(4)]       # stop at epoch 1, cursor 2
    state = interrupted.state_dict()
    assert state == {"num_items": 10, "seed": 7, "shuffle": True, "epoch": 1, "cursor": 2}

    resumed = EpochSampler(10, seed=7)
    resumed.load_state_dict(state)
    tail = [resumed.next(3) for _ in range(5)]
    assert head + tail == ref_batches


@pytest.mark.parametrize("change, message", [
    ({"num_items": 11}, "num_items=11"),
    ({"seed": 8}, "seed=8"),
    ({"cursor": 10}, "cursor=10 out of range"),
])
def test_resume_rejects_a_different_sampler(change, message):
    state = EpochSampler(10, seed=7).state_dict()
    with pytest.raises(ValueError, match=message):
        EpochSampler(10, seed=7).load_state_dict({**state, **change})


def test_prompt_stream_resume():
    data = [f"q{i}" for i in range(5)]
    ref = PromptStream(data, batch_size=2, seed=3)
    expected = [ref.next() for _ in range(6)]
    a = PromptStream(data, batch_size=2, seed=3)
    got = [a.next(), a.next()]
    b = PromptStream(data, batch_size=2, seed=3)
    b.load_state_dict(a.state_dict())
    got += [b.next() for _ in range(4)]
    assert got == expected
    assert sorted(sum(expected[:2], []) + expected[2][:1]) == data  # epoch 0 = all items once
    with pytest.raises(ValueError, match="num_items"):
        EpochSampler(0)
