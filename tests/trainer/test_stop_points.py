"""Stops at every stage boundary (after the rollout, after an optimizer step, after the weight sync):
the run saves right there, and the run resumed from that checkpoint finishes exactly as the
uninterrupted run (bit-identical metrics on CPU) — for a stop after the rollout the step is redone,
after an optimizer step the rest of its updates run from the saved batch."""

from __future__ import annotations

import json

import pytest

from delta_megatron.config import load_config
from delta_megatron.parallel import destroy, init_distributed
from delta_megatron.tracking import read_metrics
from delta_megatron.trainer import Trainer
from pipelines.tiny_arith_cpu import smoke_config

STEPS = 3


def config(out, resume: bool = False):
    return load_config(base=smoke_config(str(out), "delta", steps=STEPS), overrides=[
        "data.synthetic_digits=1", "train.mini_batches=2", "checkpoint.every=0",
        f"checkpoint.resume={'auto' if resume else 'none'}"])


def run(cfg, interrupt=None) -> Trainer:
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    try:
        trainer = Trainer(cfg)
        if interrupt is not None:
            interrupt(trainer)
        trainer.fit()
    finally:
        destroy()
    return trainer


def comparable(path):
    return [{k: v for k, v in r.items() if not k.startswith("time") and k != "reward/seconds"}
            for r in read_metrics(path / "delta" / "metrics.jsonl")]


def signal_during(stage: str, step: int):
    """Set the preemption flag (as SIGUSR1 would) while ``stage`` of ``step`` runs."""
    def install(trainer: Trainer) -> None:
        def flag():
            trainer.preemption.request("SIGUSR1")

        if stage == "rollout":
            inner = trainer.rollout
            trainer.rollout = lambda s: (inner(s), flag() if s == step else None)[0]
        elif stage == "optimizer step":
            inner, calls = trainer.actor._train_minibatch, []

            def spy(*args, **kwargs):
                calls.append(1)
                out = inner(*args, **kwargs)
                if len(calls) == 2 * step + 1:  # the first of the step's two updates
                    flag()
                return out
            trainer.actor._train_minibatch = spy
        else:
            inner, calls = trainer.sync_weights, []

            def sync():
                calls.append(1)
                if len(calls) == step + 1:  # the first call is the initial sync of __init__
                    flag()
                return inner()
            trainer.sync_weights = sync
    return install


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    run(config(out))
    return comparable(out)


@pytest.mark.slow
@pytest.mark.parametrize("stage, resume_step, done", [("rollout", 1, None), ("optimizer step", 1, 1),
                                                      ("sync", 2, None)])
def test_stop_saves_at_the_boundary_and_resumes_exactly(reference, tmp_path, stage, resume_step, done):
    stopped = run(config(tmp_path), signal_during(stage, step=1))
    assert stopped.preempted
    events = [json.loads(line) for line in (tmp_path / "delta" / "timeline.jsonl").read_text().splitlines()]
    stop = next(e for e in events if e["event"] == "stop")
    assert (stop["step"], stop["stage"], stop["reason"], stop["resume_step"]) == (1, stage, "SIGUSR1",
                                                                                 resume_step)
    boundaries = [e["stage"] for e in events if e["event"] == "boundary"]
    assert boundaries[-1] == stage and sum(e["stop"] for e in events if e["event"] == "boundary") == 1
    logged = comparable(tmp_path)
    assert [r["step"] for r in logged] == list(range(resume_step))  # the redone / resumed step is not
    assert logged == reference[:resume_step]
    if done is not None:  # the batch and the updates already taken travel in the checkpoint
        import torch
        state = torch.load(tmp_path / "delta" / "checkpoints" / f"step_{resume_step:08d}" / "trainer.pt",
                           weights_only=False)
        assert state["work"]["done"] == done and state["work"]["batch"].num_seqs == 32

    resumed = run(config(tmp_path, resume=True))
    assert not resumed.preempted
    assert comparable(tmp_path) == reference
