"""The colocated lifecycle (delta_megatron/lifecycle.py): the move table, the residency it implies,
and the calls it makes — against the SGLang-protocol test server, interleaved with the actor's."""

from __future__ import annotations

import pytest

from delta_megatron.config import SGLangConfig
from delta_megatron.lifecycle import Lifecycle, MemoryConfig, checkpoint_moves, resident, transitions
from delta_megatron.rollout.engine import GenerateRequest, RolloutError, SamplingParams
from delta_megatron.rollout.sglang_engine import SGLangEngine
from tests.doubles.fake_sglang import FakeSGLangServer
from tests.rollout.tiny import EOS, PAD, greedy_reference, tiny_model

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6)
ENGINE = {"engine weights", "engine kv_cache"}


def test_residency_per_phase():
    default = resident(MemoryConfig())
    assert default == {"rollout": {"weights"} | ENGINE, "train": {"weights", "grads", "optimizer"},
                       "sync": {"weights", "engine weights"},
                       "save": {"weights", "optimizer", "engine weights"}}
    lean = resident(MemoryConfig(offload_weights=True))
    assert lean["rollout"] == ENGINE and lean["sync"] == {"weights", "engine weights"}
    assert lean["save"] == {"weights", "optimizer", "engine weights"}
    keep = resident(MemoryConfig(offload_optimizer=False))  # only the engine moves
    assert keep["rollout"] == {"weights", "grads", "optimizer"} | ENGINE
    assert keep["save"] == keep["rollout"]
    everything = {"weights", "grads", "optimizer"} | ENGINE
    assert all(v == everything for v in resident(MemoryConfig(colocate=False)).values())


def test_moves_free_before_they_allocate_and_weights_come_back_before_the_kv_cache():
    table = transitions(MemoryConfig(offload_weights=True))
    assert [str(m) for m in table[("rollout", "train")]] == [
        "engine.release(kv_cache, weights)", "actor.onload(weights, optimizer, grads)"]
    assert [str(m) for m in table[("train", "sync")]] == [
        "actor.offload(optimizer, grads)", "engine.resume(weights)"]
    assert [str(m) for m in table[("sync", "rollout")]] == [
        "actor.offload(weights)", "engine.resume(kv_cache)"]
    for moves in table.values():
        frees = [m.frees for m in moves]
        assert frees == sorted(frees, reverse=True)
    there, back = checkpoint_moves(MemoryConfig(), "rollout")
    assert [str(m) for m in there] == ["engine.release(kv_cache)", "actor.onload(optimizer)"]
    assert [str(m) for m in back] == ["actor.offload(optimizer)", "engine.resume(kv_cache)"]
    assert checkpoint_moves(MemoryConfig(), "train") == ((), ())
    with pytest.raises(RuntimeError, match="rollout or train phase"):
        checkpoint_moves(MemoryConfig(), "sync")


class ActorDouble:
    """Records offload/onload calls with the number of server requests seen so far."""

    def __init__(self, server: FakeSGLangServer, events: list):
        self.server, self.events = server, events

    def offload(self, parts):
        self.events.append((len(self.server.requests), f"actor.offload({', '.join(parts)})"))

    def onload(self, parts=None):
        self.events.append((len(self.server.requests), f"actor.onload({', '.join(parts)})"))


def timeline(server: FakeSGLangServer, events: list) -> list[str]:
    """Server requests (path + tags) and actor calls in the order they happened."""
    out, k = [], 0
    for i, req in enumerate(server.requests):
        while k < len(events) and events[k][0] <= i:
            out.append(events[k][1])
            k += 1
        tags = f" {req['body'].get('tags')}" if "memory_occupation" in req["path"] else ""
        out.append(req["path"] + tags)
    return out + [e[1] for e in events[k:]]


def test_call_sequence_against_the_sglang_protocol_server():
    new_weights = {n: t.clone() for n, t in tiny_model(1).state_dict().items() if n != "lm_head.weight"}
    with FakeSGLangServer(tiny_model(0), PAD, EOS, max_lifetime_s=120) as fake:
        engine = SGLangEngine(None, [fake.url], config=SGLangConfig(request_timeout_s=30, max_retries=0,
                                                                     max_concurrency=2), backoff_s=0.01)
        events: list = []
        life = Lifecycle(MemoryConfig(offload_weights=True), ActorDouble(fake, events), engine)
        life.enter("rollout")  # from the freshly built state: the actor's state leaves
        engine.generate([GenerateRequest("a", [5, 6, 7], GREEDY)])
        life.enter("train")
        with pytest.raises(RolloutError, match="memory released"):  # the servers hold no weights now
            engine.generate([GenerateRequest("b", [5, 6, 7], GREEDY)])
        life.enter("sync")
        engine.update_weights(new_weights.items())
        life.enter("rollout")
        sample, = engine.generate([GenerateRequest("c", [5, 6, 7], GREEDY)])
        with life.checkpoint():
            assert life.phase == "save"
        with pytest.raises(RuntimeError, match="cannot enter 'sync' from 'rollout'"):
            life.enter("sync")
        seen = timeline(fake, events)
    assert sample.response_ids == greedy_reference(tiny_model(1), [5, 6, 7], 6, {EOS})
    assert seen == [
        "actor.offload(optimizer, grads, weights)",
        "/generate",
        "/release_memory_occupation ['kv_cache', 'weights']", "actor.onload(weights, optimizer, grads)",
        "/generate",  # refused (400): generation needs the memory back
        "actor.offload(optimizer, grads)", "/resume_memory_occupation ['weights']",
        "/pause_generation", "/update_weights_from_tensor", "/flush_cache", "/continue_generation",
        "actor.offload(weights)", "/resume_memory_occupation ['kv_cache']",
        "/generate",
        "/release_memory_occupation ['kv_cache']", "actor.onload(weights, optimizer)",  # checkpoint
        "actor.offload(weights, optimizer)", "/resume_memory_occupation ['kv_cache']",
    ]
    assert life.trace == [  # (phase entered, move) of every call made, engine and actor
        ("rollout", "actor.offload(optimizer, grads, weights)"),
        ("train", "engine.release(kv_cache, weights)"), ("train", "actor.onload(weights, optimizer, grads)"),
        ("sync", "actor.offload(optimizer, grads)"), ("sync", "engine.resume(weights)"),
        ("rollout", "actor.offload(weights)"), ("rollout", "engine.resume(kv_cache)"),
        ("save", "engine.release(kv_cache)"), ("save", "actor.onload(weights, optimizer)"),
        ("rollout", "actor.offload(weights, optimizer)"), ("rollout", "engine.resume(kv_cache)")]


def test_not_colocated_makes_no_calls():
    class Strict:
        def __getattr__(self, name):
            raise AssertionError(f"unexpected call {name}")

    life = Lifecycle(MemoryConfig(colocate=False), Strict(), Strict())
    for phase in ("rollout", "train", "sync", "rollout"):
        life.enter(phase)
    with life.checkpoint():
        pass
    assert life.trace == [] and life.phase == "rollout"
