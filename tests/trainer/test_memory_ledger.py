"""One memory model for the planner and the code: the tiny recipe's run goes through the phases the
planner models, and in each one the state the code really holds (measured from the actor's and the
embedded engine's tensors) is the ledger's — same components, same bytes — and the planner's table
is the very ledger the trainer logs."""

from __future__ import annotations

import json

import pytest

from delta_megatron.config import load_config
from delta_megatron.memory_ledger import LIFECYCLE_PHASE, STATE
from delta_megatron.parallel import destroy, init_distributed
from delta_megatron.planner import PlanOptions, load_hardware, plan
from delta_megatron.trainer import Trainer
from pipelines.tiny_arith_cpu import smoke_config

ACTOR = ("weights", "grads", "optimizer")


def measured_state(event: dict) -> dict[str, float]:
    """What the code held on entering the phase: parts with bytes on the device (the embedded
    engine's KV cache lives inside generate: held unless its tag is released)."""
    m = event["measured"]
    held = {k: m[k] for k in (*ACTOR, "engine weights") if m[k] > 0}
    if "kv_cache" not in event["released"]:
        held["engine kv_cache"] = m["engine kv_cache"]
    return held


@pytest.mark.slow
def test_phases_and_resident_state_are_the_ledgers(tmp_path):
    cfg = load_config(base=smoke_config(str(tmp_path), "delta", steps=2),
                      overrides=["data.synthetic_digits=1", "checkpoint.every=1"])
    init_distributed(cfg.parallel, seed=cfg.train.seed)
    try:
        Trainer(cfg).fit()
    finally:
        destroy()
    events = [json.loads(line) for line in (tmp_path / "delta" / "timeline.jsonl").read_text().splitlines()]
    phases = [e for e in events if e["event"] == "phase"]
    step = ["train", "sync", "rollout", "save"]
    assert [e["phase"] for e in phases] == ["rollout"] + step * 2
    assert [sorted(e["ledger"]) for e in phases[:5]] == [["rollout"], ["logprob", "train"], ["sync"], ["rollout"],
                                                         ["save"]]
    assert phases[1]["measured"]["optimizer"] == 0  # Adam creates its state at the first step ...
    phases[1]["measured"]["optimizer"] = phases[5]["measured"]["optimizer"]  # ... that size ever after
    for event in phases:
        held = measured_state(event)
        for name, entry in event["ledger"].items():
            modelled = {k: v for k, v in entry.items() if k in STATE}
            assert set(held) == set(modelled), (event["phase"], name)
            for part in ("weights", "grads", "optimizer", "engine weights"):
                if part in held:  # exact: fp32 weights, no distributed-optimizer padding
                    assert held[part] == modelled[part], (event["phase"], part)
    # what was released and offloaded between the phases is what the ledger drops
    moves = [(["kv_cache", "weights"], []), (["kv_cache"], ["grads", "optimizer"]),
             ([], ["grads", "optimizer"]), (["kv_cache"], ["grads"])]
    assert [(e["released"], e["offloaded"]) for e in phases] == [([], ["grads", "optimizer"])] + moves * 2
    assert phases[5]["measured"]["optimizer"] == 8 * phases[5]["measured"]["weights"] / 4  # Adam m, v in fp32

    # the planner's table is the ledger the trainer logged (the embedded engine: no device size needed)
    hw = load_hardware("local")
    hw.gpus_per_node = 1  # the run above: one process
    planned = plan(cfg, hw, PlanOptions(nodes=1, recompute="config"))
    logged = {name: entry for e in phases for name, entry in e["ledger"].items()}
    for phase, parts in planned.memory.items():
        assert {k: float(v) for k, v in parts.items()} == logged[phase], phase
    assert {LIFECYCLE_PHASE[p] for p in planned.memory} == {e["phase"] for e in phases}
