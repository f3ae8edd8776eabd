"""EmbeddedEngine: greedy/sampled generation against slow references, seeds, stops, abort, weights."""

from __future__ import annotations

import pytest
import torch

from delta_megatron.rollout.embedded import EmbeddedEngine
from delta_megatron.rollout.engine import (
    GenerateRequest,
    PartialRolloutBuffer,
    RolloutEngine,
    SamplingParams,
    WeightSyncError,
)
from tests.rollout.tiny import EOS, PAD, greedy_reference, recompute_logprobs

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20], [30, 31]]  # unequal lengths: left padding
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


def _requests(params, prompts=PROMPTS, prefix="r"):
    return [GenerateRequest(f"{prefix}{i}", p, params, group_id=i) for i, p in enumerate(prompts)]


def test_protocol_and_greedy_matches_full_forward_reference(model):
    engine = EmbeddedEngine(model, PAD, EOS, batch_size=3)  # 4 prompts -> 2 micro-batches
    assert isinstance(engine, RolloutEngine)
    samples = engine.generate(_requests(GREEDY))
    for prompt, s in zip(PROMPTS, samples):
        ref = greedy_reference(model, prompt, 12, {EOS})
        assert s.response_ids == ref
        assert s.finish_reason == ("stop" if ref[-1] == EOS else "length")
        assert s.prompt_ids == prompt and s.index == 0 and len(s.logprobs) == len(ref)
    again = EmbeddedEngine(model, PAD, EOS, batch_size=16).generate(_requests(GREEDY))
    assert [s.response_ids for s in again] == [s.response_ids for s in samples]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_rollout_logprobs_equal_recomputation(model, temperature):
    params = SamplingParams(temperature=temperature, top_k=10, top_p=0.9, max_new_tokens=10,
                            n=2, seed=11)
    samples = EmbeddedEngine(model, PAD, EOS).generate(_requests(params))
    assert [s.sample_id for s in samples] == [f"r{i}-{j}" for i in range(4) for j in range(2)]
    for s in samples:
        ref = recompute_logprobs(model, s.prompt_ids, s.response_ids, temperature)
        torch.testing.assert_close(torch.tensor(s.logprobs), ref, atol=1e-5, rtol=0)


def test_seed_reproducible_and_isolated_from_global_rng(model):
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=3, seed=7)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = EmbeddedEngine(model, PAD, EOS).generate(_requests(params))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not advanced
    torch.manual_seed(999)  # a different global state must not change seeded samples
    second = EmbeddedEngine(model, PAD, EOS).generate(_requests(params))
    assert [s.response_ids for s in first] == [s.response_ids for s in second]
    other = EmbeddedEngine(model, PAD, EOS).generate(_requests(params.replace(seed=8)))
    assert [s.response_ids for s in other] != [s.response_ids for s in first]
    # the n samples of one request differ from each other (they are not copies)
    assert len({tuple(s.response_ids) for s in first[:3]}) > 1
    # sample j depends on (request seed, j) only: not on batch mates, batch_size or first_index order
    alone = EmbeddedEngine(model, PAD, EOS, batch_size=1).generate(_requests(params)[1:2])
    assert [s.response_ids for s in alone] == [s.response_ids for s in first[3:6]]
    mixed = [GenerateRequest(f"r{i}", p, params.replace(seed=7 if i == 1 else 100 + i))
             for i, p in enumerate(PROMPTS)]
    shared = EmbeddedEngine(model, PAD, EOS, batch_size=16).generate(mixed)
    assert [s.response_ids for s in shared[3:6]] == [s.response_ids for s in first[3:6]]


def test_stop_ids_and_max_new_tokens(model):
    prompt = PROMPTS[1]
    ref = greedy_reference(model, prompt, 12, {EOS})
    assert EOS not in ref, "fixture changed: pick a prompt whose greedy run has no EOS"
    k = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i])
    engine = EmbeddedEngine(model, PAD, EOS)
    stopped, = engine.generate([GenerateRequest("s", prompt, GREEDY.replace(stop_token_ids=(ref[k],)))])
    assert stopped.response_ids == ref[: k + 1] and stopped.finish_reason == "stop"
    short, = engine.generate([GenerateRequest("m", prompt, GREEDY.replace(max_new_tokens=4))])
    assert short.response_ids == ref[:4] and short.finish_reason == "length"
    eos_engine = EmbeddedEngine(model, PAD, eos_token_id=ref[k])  # the model's EOS stops too
    as_eos, = eos_engine.generate([GenerateRequest("e", prompt, GREEDY)])
    assert as_eos.response_ids == ref[: k + 1] and as_eos.finish_reason == "stop"


def test_update_weights_round_trip_perturb_and_restore(model):
    engine = EmbeddedEngine(model, PAD, EOS)
    before = engine.generate(_requests(GREEDY))
    original = {n: t.clone() for n, t in model.state_dict().items()}
    engine.update_weights(list(original.items()))  # own state dict: includes the tied lm_head alias
    assert engine.weight_version == 1
    assert [s.response_ids for s in engine.generate(_requests(GREEDY))] == \
        [s.response_ids for s in before]
    gen = torch.Generator().manual_seed(0)
    perturbed = {n: t + 0.5 * torch.randn(t.shape, generator=gen) for n, t in original.items()
                 if n != "lm_head.weight"}  # tied: the embedding alone sets both
    engine.update_weights(perturbed.items())
    for name, t in perturbed.items():
        assert torch.equal(model.state_dict()[name], t)
    assert torch.equal(model.lm_head.weight, perturbed["model.embed_tokens.weight"])
    changed = engine.generate(_requests(GREEDY))
    assert [s.response_ids for s in changed] != [s.response_ids for s in before]
    assert [s.response_ids for s in changed] == \
        [greedy_reference(model, p, 12, {EOS}) for p in PROMPTS]
    engine.update_weights(original.items())
    restored = engine.generate(_requests(GREEDY))
    assert [s.response_ids for s in restored] == [s.response_ids for s in before]
    assert [s.logprobs for s in restored] == [s.logprobs for s in before]
    assert restored[0].weight_version == 3


def test_update_weights_rejects_bad_names_shapes_and_missing(model):
    engine = EmbeddedEngine(model, PAD, EOS)
    state = model.state_dict()
    with pytest.raises(WeightSyncError, match=r"unknown weight name 'model.layers.0.mlp.up.weight'"):
        engine.update_weights([("model.layers.0.mlp.up.weight", state["model.norm.weight"])])
    with pytest.raises(WeightSyncError, match=r"'model.norm.weight' has shape \(3,\)"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))])
    with pytest.raises(WeightSyncError, match=r"weights received nothing, e.g. model.embed_tokens"):
        engine.update_weights([("model.norm.weight", state["model.norm.weight"])])
    bad_tie = dict(state)
    bad_tie["lm_head.weight"] = state["model.embed_tokens.weight"] + 1
    with pytest.raises(WeightSyncError, match="tied weights"):
        engine.update_weights(bad_tie.items())
    assert engine.update_weights([("model.norm.weight", state["model.norm.weight"])],
                                 allow_partial=True) == 1


def test_update_weights_from_disk(model, tmp_path):
    from safetensors.torch import save_file

    engine = EmbeddedEngine(model, PAD, EOS)
    original = {n: t.clone() for n, t in model.state_dict().items() if n != "lm_head.weight"}
    save_file(original, str(tmp_path / "model.safetensors"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    engine.update_weights_from_disk(tmp_path)
    for name, t in original.items():
        assert torch.equal(model.state_dict()[name], t)


def test_abort_mid_generation_keeps_partial_tokens_and_continuation_matches(model):
    engine = EmbeddedEngine(model, PAD, EOS)
    prompt = PROMPTS[1]
    ref = greedy_reference(model, prompt, 12, {EOS})
    calls = []

    def abort_at_third_step(module, args, output):  # deterministic: abort from inside a forward
        calls.append(1)
        if len(calls) == 3:
            engine.abort(["a"])

    handle = model.register_forward_hook(abort_at_third_step)
    try:
        partial, other = engine.generate([GenerateRequest("a", prompt, GREEDY),
                                          GenerateRequest("b", PROMPTS[0], GREEDY)])
    finally:
        handle.remove()
    assert partial.finish_reason == "abort" and partial.response_ids == ref[:3]
    assert other.finish_reason != "abort"
    assert other.response_ids == greedy_reference(model, PROMPTS[0], 12, {EOS})
    buffer = PartialRolloutBuffer()
    assert buffer.split([partial, other]) == [other] and len(buffer) == 1
    requests, finished = buffer.continuations(GREEDY)
    assert finished == [] and requests[0].response_prefix_ids == ref[:3]
    assert requests[0].remaining_tokens == 9
    done, = engine.generate(requests)
    assert done.response_ids == ref and done.prefix_len == 3 and done.sample_id == "a-0"
    assert done.logprobs[:3] == partial.logprobs
    torch.testing.assert_close(torch.tensor(done.logprobs),
                               recompute_logprobs(model, prompt, ref, 0.0), atol=1e-5, rtol=0)


def test_abort_before_start_and_pause_state(model):
    engine = EmbeddedEngine(model, PAD, EOS, batch_size=1)
    seen = []

    def abort_other(module, args, output):
        if not seen:
            seen.append(1)
            engine.abort(["second"])  # not started yet: comes back empty, never generated

    handle = model.register_forward_hook(abort_other)
    try:
        first, second = engine.generate(_requests(GREEDY, PROMPTS[:2], prefix="x")[:1]
                                        + [GenerateRequest("second", PROMPTS[1], GREEDY)])
    finally:
        handle.remove()
    assert second.finish_reason == "abort" and second.response_ids == []
    assert first.finish_reason != "abort"
    engine.abort(["not-in-flight"])  # ignored: later calls are unaffected
    assert engine.generate([GenerateRequest("not-in-flight", [5], GREEDY)])[0].finish_reason != "abort"
    engine.pause()
    assert engine.paused
    engine.resume()
    assert not engine.paused and engine.health()
    engine.close()
    assert not engine.health()


def test_config_glue_and_duplicate_samples(model):
    from delta_megatron.config import RolloutConfig
    from delta_megatron.rollout import make_engine

    cfg = RolloutConfig(n_samples=4, temperature=0.9, top_p=0.8, top_k=5, max_new_tokens=7,
                        batch_size=3)
    assert SamplingParams.from_config(cfg, temperature=0.5) == SamplingParams(
        temperature=0.5, top_p=0.8, top_k=5, max_new_tokens=7, n=4)
    engine = make_engine(cfg, model=model, pad_token_id=PAD, eos_token_id=EOS)
    assert isinstance(engine, EmbeddedEngine) and engine.batch_size == 3
    with pytest.raises(ValueError, match="sample id 'd-0' requested twice"):
        engine.generate([GenerateRequest("d", [5], GREEDY), GenerateRequest("d", [6], GREEDY)])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)


def test_memory_release_resume_protocol(model):
    """Colocation: released weights are freed and discarded; the engine generates again only after
    weights resume → every weight updated → kv_cache resume (slime's order), and then exactly as an
    engine that was never released."""
    from delta_megatron.rollout.engine import RolloutError
    from tests.rollout.tiny import tiny_model

    new = {n: t.clone() for n, t in tiny_model(1).state_dict().items()}
    engine = EmbeddedEngine(model, PAD, EOS)
    weight_bytes = engine.resident_bytes()["weights"]
    assert weight_bytes == sum(p.numel() * 4 for p in model.parameters())  # tied embedding counted once

    engine.release_memory_occupation(["kv_cache", "weights"])
    assert engine.resident_bytes() == {"weights": 0, "kv_cache": 0}
    assert all(p.untyped_storage().nbytes() == 0 for p in model.parameters())
    with pytest.raises(RolloutError, match="memory released"):
        engine.generate(_requests(GREEDY))
    with pytest.raises(WeightSyncError, match="released"):
        engine.update_weights(new.items())
    with pytest.raises(RolloutError, match="already released"):
        engine.release_memory_occupation(["weights"])
    with pytest.raises(ValueError, match="unknown memory tags"):
        engine.release_memory_occupation(["cuda_graph_x"])

    engine.resume_memory_occupation(["weights"])
    assert engine.resident_bytes()["weights"] == weight_bytes
    assert all(not p.detach().any() for p in model.parameters())  # contents were discarded
    first = dict(list(new.items())[:3])
    engine.update_weights(first.items(), allow_partial=True)
    engine.resume_memory_occupation(["kv_cache"])
    with pytest.raises(RolloutError, match="not updated since resume"):
        engine.generate(_requests(GREEDY))
    engine.update_weights(new.items())
    got = engine.generate(_requests(GREEDY))
    want = EmbeddedEngine(tiny_model(1), PAD, EOS).generate(_requests(GREEDY))
    assert [s.response_ids for s in got] == [s.response_ids for s in want]
    with pytest.raises(RolloutError, match="not released"):
        engine.resume_memory_occupation(["kv_cache"])
