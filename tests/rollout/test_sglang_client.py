"""SGLangEngine against the in-process fake server: payload fields, retries, abort, pause, weight sync."""

from __future__ import annotations

import threading

import pytest
import torch

from delta_megatron.config import SGLangConfig
from delta_megatron.rollout.engine import (
    GenerateRequest,
    PartialRolloutBuffer,
    RolloutEngine,
    RolloutError,
    Sample,
    SamplingParams,
    WeightSyncError,
)
from delta_megatron.rollout.sglang_engine import SGLangEngine
from delta_megatron.rollout.weight_sync import DiskSync, TensorSync, iter_buckets
from tests.doubles.fake_sglang import FakeSGLangServer
from tests.rollout.tiny import EOS, PAD, greedy_reference, recompute_logprobs, tiny_model

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)


def _engine(*fakes, timeout=30.0, retries=2, **kw) -> SGLangEngine:
    cfg = SGLangConfig(request_timeout_s=timeout, max_retries=retries, max_concurrency=4)
    return SGLangEngine(None, [f.url for f in fakes], config=cfg, backoff_s=0.01, **kw)


@pytest.fixture
def fake():
    with FakeSGLangServer(tiny_model(0), PAD, EOS, max_lifetime_s=120) as server:
        yield server


def _perturbed(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: t + 0.25 * torch.randn(t.shape, generator=gen)
            for n, t in tiny_model(0).state_dict().items() if n != "lm_head.weight"}


def test_generate_round_trip_uses_sglang_fields(fake):
    engine = _engine(fake)
    assert isinstance(engine, RolloutEngine) and engine.health()
    reference = tiny_model(0)
    sampled = SamplingParams(temperature=0.7, top_p=0.9, top_k=10, max_new_tokens=8,
                             stop_token_ids=(40,), n=2, seed=5)
    samples = engine.generate([GenerateRequest("g", [5, 6, 7], GREEDY, group_id=0),
                               GenerateRequest("s", [9, 10], sampled, group_id=1)])
    assert [s.sample_id for s in samples] == ["g-0", "s-0", "s-1"]
    assert samples[0].response_ids == greedy_reference(reference, [5, 6, 7], 8, {EOS})
    for s, t in zip(samples, [0.0, 0.7, 0.7]):
        torch.testing.assert_close(torch.tensor(s.logprobs),
                                   recompute_logprobs(reference, s.prompt_ids, s.response_ids, t),
                                   atol=1e-5, rtol=0)
    bodies = sorted(fake.calls("/generate"), key=lambda b: b["rid"])
    assert [set(b) for b in bodies] == [{"rid", "input_ids", "sampling_params", "return_logprob"}] * 3
    assert [b["rid"].rsplit("-", 1)[0] for b in bodies] == ["g-0", "s-0", "s-1"]
    assert bodies[0]["sampling_params"] == {"temperature": 0.0, "top_p": 1.0, "top_k": -1,
                                            "max_new_tokens": 8, "stop_token_ids": []}
    assert bodies[1]["sampling_params"] == {"temperature": 0.7, "top_p": 0.9, "top_k": 10,
                                            "max_new_tokens": 8, "stop_token_ids": [40],
                                            "sampling_seed": 5}
    assert bodies[2]["sampling_params"]["sampling_seed"] == 6  # sample j uses seed + j
    assert bodies[1]["input_ids"] == [9, 10] and bodies[1]["return_logprob"] is True


def test_timeout_aborts_stale_attempt_and_retries(fake):
    fake.hang_next("/generate")
    engine = _engine(fake, timeout=3.0, retries=2)  # the retry must finish within it on a loaded CI box
    sample, = engine.generate([GenerateRequest("t", [5, 6, 7], GREEDY)])
    assert sample.response_ids == greedy_reference(tiny_model(0), [5, 6, 7], 8, {EOS})
    first, second = [b["rid"] for b in fake.calls("/generate")]
    assert first != second and first.startswith("t-0-") and second.startswith("t-0-")
    assert fake.wait_for("/abort_request", 1, timeout=30)  # sent in the background, not before the retry
    assert {"rid": first} in fake.calls("/abort_request")  # the stale attempt was aborted


def test_server_errors_retry_then_fail_with_context(fake):
    fake.fail_next("/generate", 1, status=500)
    engine = _engine(fake, retries=2)
    assert engine.generate([GenerateRequest("a", [5], GREEDY)])[0].finish_reason != "abort"
    assert len(fake.calls("/generate")) == 2
    fake.fail_next("/generate", 3, status=503)
    with pytest.raises(RolloutError, match=r"sample b-0 failed: POST .*/generate failed after 3 "
                                           r"attempt\(s\).*HTTP 503"):
        engine.generate([GenerateRequest("b", [5], GREEDY)])
    fake.fail_next("/generate", 1, status=400)  # a client error is not retried
    calls = len(fake.calls("/generate"))
    with pytest.raises(RolloutError, match="HTTP 400"):
        engine.generate([GenerateRequest("c", [5], GREEDY)])
    assert len(fake.calls("/generate")) == calls + 1


def test_abort_in_flight_then_recycle_partial_samples():
    with FakeSGLangServer(tiny_model(0), PAD, EOS, gate_generate=True, max_lifetime_s=120) as fake:
        engine = _engine(fake)
        result: list[Sample] = []
        worker = threading.Thread(target=lambda: result.extend(engine.generate(
            [GenerateRequest("x", [5, 6, 7], GREEDY), GenerateRequest("y", [9, 10], GREEDY)])))
        worker.start()
        assert fake.wait_for("/generate", 2)  # both requests are held by the gate
        engine.abort(["x"])
        assert fake.wait_for("/abort_request", 1)
        fake.open_gate()
        worker.join(60)
        x, y = result
        assert x.finish_reason == "abort" and x.response_ids == []
        assert y.finish_reason == "length" and len(y.response_ids) == 8
        rid_x = next(b["rid"] for b in fake.calls("/generate") if b["rid"].startswith("x-0-"))
        assert fake.calls("/abort_request") == [{"rid": rid_x}]

        # a sample aborted after 3 tokens continues from them: one request, prefix kept
        ref = greedy_reference(tiny_model(0), [5, 6, 7], 8, {EOS})
        lps = recompute_logprobs(tiny_model(0), [5, 6, 7], ref[:3], 0.0).tolist()
        partial = Sample("x", 0, [5, 6, 7], ref[:3], lps, "abort", group_id=4)
        buffer = PartialRolloutBuffer()
        assert buffer.split([partial, y]) == [y]
        requests, finished = buffer.continuations(GREEDY)
        done, = engine.generate(requests)
        assert done.response_ids == ref and done.logprobs[:3] == lps and done.prefix_len == 3
        assert done.group_id == 4 and done.sample_id == "x-0"
        body = fake.calls("/generate")[-1]
        assert body["input_ids"] == [5, 6, 7] + ref[:3]
        assert body["sampling_params"]["max_new_tokens"] == 5


def test_failed_tensor_update_leaves_servers_resumed(fake):
    fake.fail_next("/update_weights_from_tensor", 1, status=400)
    engine = _engine(fake, weight_sync=TensorSync(bucket_mb=1))
    with pytest.raises(WeightSyncError, match=r"weight sync \(ipc\) to http://127\.0\.0\.1:\d+ "
                                              r"failed: .*/update_weights_from_tensor.*HTTP 400"):
        engine.update_weights(_perturbed().items())
    paths = [r["path"] for r in fake.requests if r["path"] != "/health"]
    assert paths == ["/pause_generation", "/update_weights_from_tensor", "/continue_generation"]
    assert not fake.paused and engine.weight_version == 0


def test_failed_pause_on_one_server_resumes_the_others():
    with FakeSGLangServer(tiny_model(0), PAD, EOS) as a, FakeSGLangServer(tiny_model(0), PAD, EOS) as b:
        b.fail_next("/pause_generation", 5, status=400)
        engine = _engine(a, b)
        with pytest.raises(RolloutError, match="pause_generation"):
            engine.update_weights(_perturbed().items())
        assert a.calls("/pause_generation") and a.calls("/continue_generation")
        assert not a.paused and not b.paused
        assert not a.calls("/update_weights_from_tensor")


def test_tensor_sync_buckets_payload_and_check_weights(fake):
    state = _perturbed()
    bucket_mb = 8192 / 2**20  # 8 KiB buckets: several requests for the tiny model
    engine = _engine(fake, weight_sync=TensorSync(bucket_mb=bucket_mb))
    engine.update_weights(state.items())
    expected = list(iter_buckets(state.items(), 8192))
    bodies = fake.calls("/update_weights_from_tensor")
    assert len(expected) > 2 and len(bodies) == len(expected)
    for body in bodies:
        assert set(body) == {"serialized_named_tensors", "load_format", "flush_cache",
                             "weight_version"}
        assert len(body["serialized_named_tensors"]) == 1
        assert isinstance(body["serialized_named_tensors"][0], str)
        assert body["flush_cache"] is False and body["weight_version"] == "1"
    paths = [r["path"] for r in fake.requests][-3:]
    assert paths == ["/update_weights_from_tensor", "/flush_cache", "/continue_generation"]
    served = fake.engine.model.state_dict()
    for name, t in state.items():
        assert torch.equal(served[name], t), name
    engine.check_weights(state.items())  # exact match through /get_weights_by_name
    assert fake.calls("/get_weights_by_name")[0] == {"name": next(iter(state)), "truncate_size": 100}
    wrong = dict(state)
    wrong["model.layers.1.mlp.up_proj.weight"] = wrong["model.layers.1.mlp.up_proj.weight"] + 1e-3
    with pytest.raises(WeightSyncError, match=r"1 of \d+ weights differ.*"
                                              r"model\.layers\.1\.mlp\.up_proj\.weight"):
        engine.check_weights(wrong.items())
    sample, = engine.generate([GenerateRequest("after", [5, 6, 7], GREEDY)])
    assert sample.weight_version == 1


def test_check_after_sync_runs_automatically(fake):
    engine = _engine(fake, weight_sync=TensorSync(bucket_mb=1), check_weights=True, check_truncate=4)
    engine.update_weights(_perturbed().items())
    assert len(fake.calls("/get_weights_by_name")) == len(_perturbed())
    assert {b["truncate_size"] for b in fake.calls("/get_weights_by_name")} == {4}


def test_disk_sync_and_update_from_disk(fake, tmp_path):
    state = _perturbed(2)
    engine = _engine(fake, weight_sync=DiskSync(tmp_path / "sync", shard_mb=8192 / 2**20))
    engine.update_weights(state.items())
    body, = fake.calls("/update_weights_from_disk")
    assert body == {"model_path": str(tmp_path / "sync"), "load_format": None,
                    "abort_all_requests": False, "weight_version": "1", "flush_cache": False}
    assert len(list((tmp_path / "sync").glob("*.safetensors"))) > 1
    engine.check_weights(state.items())
    tiny_model(0).save_pretrained(tmp_path / "hf")  # an HF export, loaded by path
    engine.update_weights_from_disk(tmp_path / "hf")
    engine.check_weights(tiny_model(0).state_dict().items())
    assert engine.weight_version == 2 and not fake.paused


def test_health_turns_false_when_server_stops():
    fake = FakeSGLangServer(tiny_model(0), PAD, EOS).start()
    engine = _engine(fake)
    assert engine.health()
    fake.stop()
    assert not engine.health()


def test_nccl_path_fails_fast_when_a_server_refuses_the_group(fake):
    import socket

    from delta_megatron.rollout.weight_sync import DistributedSync

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fake.fail_next("/init_weights_update_group", 1, status=400)
    sync = DistributedSync("127.0.0.1", port, backend="gloo", timeout_s=5)
    engine = _engine(fake, weight_sync=sync)
    with pytest.raises(WeightSyncError, match=r"/init_weights_update_group failed on the servers"):
        engine.update_weights(_perturbed().items())  # no 5 s wait for the rendezvous to time out
    body, = fake.calls("/init_weights_update_group")
    assert body == {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1,
                    "world_size": 2, "group_name": "weight_update_group_pp0", "backend": "gloo"}
    assert not fake.paused and fake.calls("/continue_generation")
