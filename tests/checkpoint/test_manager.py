"""Atomic checkpoint directories, the latest pointer, pruning, and resume resolution."""

import random

import pytest
import torch

from delta_megatron.checkpoint import CheckpointManager, resolve_resume, rng_state, set_rng_state


def test_save_latest_prune(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        mgr.save(step, lambda d, s=step: (d / "state.txt").write_text(str(s)))
    assert mgr.complete_steps() == [2, 3]
    assert mgr.latest() == tmp_path / "step_00000003"
    assert (mgr.latest() / "state.txt").read_text() == "3"
    assert resolve_resume("auto", tmp_path) == tmp_path / "step_00000003"
    assert resolve_resume("none", tmp_path) is None


def test_failed_write_leaves_previous_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(1, lambda d: (d / "ok").write_text("1"))

    def broken(d):
        (d / "partial").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        mgr.save(2, broken)
    assert mgr.latest() == tmp_path / "step_00000001"
    assert mgr.complete_steps() == [1]  # the .tmp dir is not a checkpoint
    assert (tmp_path / "step_00000002.tmp").exists()
    mgr.save(3, lambda d: None)  # the next save cleans the stale temporary directory
    assert not (tmp_path / "step_00000002.tmp").exists()


def test_resume_path_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint.resume: .* is not a checkpoint directory"):
        resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_rng_round_trip():
    state = rng_state()
    a = (random.random(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
