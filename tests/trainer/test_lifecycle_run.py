"""The colocated lifecycle inside real runs (embedded engine, Megatron actor, CPU): releasing the
engine and offloading the actor every step changes nothing in what the run computes, and a run
resumed from a checkpoint taken through the lifecycle continues exactly."""

from __future__ import annotations

import pytest

from delta_megatron.config import load_config
from delta_megatron.parallel import destroy, init_distributed
from delta_megatron.trainer import Trainer
from pipelines.tiny_arith_cpu import smoke_config


def _run(out, overrides: list[str]) -> tuple[list[dict], list]:
    cfg = load_config(base=smoke_config(str(out), "delta", steps=2), overrides=[
        "data.synthetic_digits=1", "checkpoint.every=1", "checkpoint.keep=3", *overrides])
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    try:
        trainer = Trainer(cfg)
        history = trainer.fit()
        trace = list(trainer.lifecycle.trace)
    finally:
        destroy()
    return [{k: v for k, v in row.items() if not k.startswith("time") and k != "reward/seconds"}
            for row in history], trace


@pytest.mark.slow
def test_lifecycle_changes_nothing_and_resume_is_exact(tmp_path):
    plain, none = _run(tmp_path / "plain", ["memory.colocate=false"])
    assert none == []
    lean, trace = _run(tmp_path / "lean", ["memory.offload_weights=true"])
    assert lean == plain  # bit-identical metrics: every round trip is exact
    step = [("train", "engine.release(kv_cache, weights)"), ("train", "actor.onload(weights, optimizer, grads)"),
            ("sync", "actor.offload(optimizer, grads)"), ("sync", "engine.resume(weights)"),
            ("rollout", "actor.offload(weights)"), ("rollout", "engine.resume(kv_cache)")]
    save = [("save", "engine.release(kv_cache)"), ("save", "actor.onload(weights, optimizer)"),
            ("rollout", "actor.offload(weights, optimizer)"), ("rollout", "engine.resume(kv_cache)")]
    assert trace == [("rollout", "actor.offload(optimizer, grads, weights)")] + (step + save) * 2

    # resume from the step-1 checkpoint (saved through the lifecycle) and redo step 1
    resumed, _ = _run(tmp_path / "lean", ["memory.offload_weights=true",
                                          f"checkpoint.resume={tmp_path / 'lean' / 'delta' / 'checkpoints' / 'step_00000001'}"])
    assert resumed == lean[1:]
