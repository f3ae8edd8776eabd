"""The SGLang engine against real SGLang servers (cluster only: needs sglang + CUDA).

Run on a GPU node with SGLang installed (see docs/rollout.md):

    pytest -m sglang tests/rollout/test_sglang_real.py

``DM_SGLANG_TEST_MODEL`` may name an HF checkpoint directory to serve instead of the tiny random
model saved here. The NCCL test needs two GPUs (trainer on cuda:1, server on cuda:0).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading

import pytest
import torch

from delta_megatron.config import SGLangConfig
from delta_megatron.rollout.engine import GenerateRequest, SamplingParams
from delta_megatron.rollout.weight_sync import DiskSync, DistributedSync, TensorSync
from tests.rollout.tiny import EOS, greedy_reference, recompute_logprobs, tiny_model

pytestmark = [
    pytest.mark.sglang,
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None or not torch.cuda.is_available(),
                       reason="needs a real SGLang installation and CUDA"),
]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=16)
PROMPTS = [[5, 6, 7], [9, 10, 11, 12], [20], [30, 31]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    if os.environ.get("DM_SGLANG_TEST_MODEL"):
        return os.environ["DM_SGLANG_TEST_MODEL"]
    path = tmp_path_factory.mktemp("tiny-hf")
    tiny_model(0).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def engine(model_dir, tmp_path_factory):
    from delta_megatron.rollout.sglang_engine import SGLangEngine

    cfg = SGLangConfig(servers_per_node=1, tp=1, mem_fraction=0.3, port_base=_free_port(),
                       router_port=_free_port(), request_timeout_s=300,
                       extra_args=["--skip-tokenizer-init", "--dtype", "float32",
                                   "--disable-cuda-graph", "--disable-radix-cache"])
    eng = SGLangEngine.launch(model_dir, cfg, log_dir=str(tmp_path_factory.mktemp("logs")),
                              weight_sync=TensorSync(bucket_mb=1))
    yield eng
    eng.close()


def _hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # CPU reference


def _perturbed(model, seed):
    gen = torch.Generator().manual_seed(seed)
    return {n: (t + 0.05 * torch.randn(t.shape, generator=gen)).cuda()
            for n, t in model.state_dict().items() if n != "lm_head.weight"}


def test_greedy_and_logprobs_match_hf(engine, model_dir):
    model = _hf(model_dir)
    samples = engine.generate([GenerateRequest(f"g{i}", p, GREEDY) for i, p in enumerate(PROMPTS)])
    for p, s in zip(PROMPTS, samples):
        assert s.response_ids == greedy_reference(model, p, 16, {EOS})
        torch.testing.assert_close(torch.tensor(s.logprobs),
                                   recompute_logprobs(model, p, s.response_ids, 0.0),
                                   atol=1e-3, rtol=0)


def test_ipc_update_then_check_and_generate(engine, model_dir):
    model = _hf(model_dir)
    state = _perturbed(model, 1)
    engine.update_weights(state.items())  # CUDA tensors: IPC handles, no copy
    engine.check_weights(state.items())
    model.load_state_dict({n: t.cpu() for n, t in state.items()}, strict=False)
    s, = engine.generate([GenerateRequest("ipc", PROMPTS[0], GREEDY)])
    assert s.response_ids == greedy_reference(model, PROMPTS[0], 16, {EOS})


def test_disk_update_then_check(engine, model_dir, tmp_path):
    from delta_megatron.rollout.sglang_engine import SGLangEngine

    state = _perturbed(_hf(model_dir), 2)
    disk = SGLangEngine(engine.router_url, engine.worker_urls(), config=engine.config,
                        weight_sync=DiskSync(tmp_path / "w", base_model_path=model_dir))
    disk.update_weights(state.items())
    disk.check_weights(state.items())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs a second GPU for the sender")
def test_nccl_update_then_check(engine, model_dir):
    from delta_megatron.rollout.sglang_engine import SGLangEngine

    torch.cuda.set_device(1)
    state = {n: t.to("cuda:1") for n, t in _perturbed(_hf(model_dir), 3).items()}
    sync = DistributedSync("127.0.0.1", _free_port(), bucket_mb=1)
    nccl = SGLangEngine(engine.router_url, engine.worker_urls(), config=engine.config, weight_sync=sync)
    nccl.update_weights(state.items())
    nccl.check_weights(state.items())
    sync.close(nccl)


def test_abort_returns_partial_sample(engine):
    params = SamplingParams(temperature=1.0, max_new_tokens=4096, seed=0)
    result = []
    worker = threading.Thread(target=lambda: result.extend(
        engine.generate([GenerateRequest("long", PROMPTS[0], params)])))
    worker.start()
    while not engine._rids.get("long") and worker.is_alive():  # the request is on the wire
        threading.Event().wait(0.01)
    engine.abort(["long"])
    worker.join(120)
    s, = result
    assert s.finish_reason in ("abort", "stop") and len(s.response_ids) < 4096
    assert len(s.logprobs) == len(s.response_ids)
