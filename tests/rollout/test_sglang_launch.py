"""Launching servers (fake SGLang processes) + the real sglang_router, and the NCCL-path sync on gloo.

The fake servers run as separate processes, as SGLang servers do, so the broadcast path crosses a
process boundary through the same process-group recipe SGLang uses.
"""

from __future__ import annotations

import importlib.util
import socket
import sys

import pytest
import torch

from delta_megatron.config import SGLangConfig
from delta_megatron.rollout.engine import GenerateRequest, RolloutError, SamplingParams
from delta_megatron.rollout.sglang_engine import SGLangEngine
from delta_megatron.rollout.sglang_server import launch_server_group, router_command, server_command
from delta_megatron.rollout.weight_sync import DistributedSync
from tests.dist.mg_common import free_port_block
from tests.rollout.tiny import EOS, PAD, greedy_reference, tiny_model

HAS_ROUTER = importlib.util.find_spec("sglang_router") is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_cmd(model_dir):
    def cmd(port: int, base_gpu_id: int) -> list[str]:
        return [sys.executable, "-m", "tests.doubles.fake_sglang", "--model-path",
                str(model_dir), "--port", str(port), "--pad-token-id", str(PAD), "--eos-token-id",
                str(EOS), "--max-lifetime-s", "300", "--tp-size", "1"]
    return cmd


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-hf")
    tiny_model(0).save_pretrained(path)
    return path


def test_commands_follow_sglang_and_router_clis():
    cfg = SGLangConfig(tp=2, mem_fraction=0.6, extra_args=["--disable-cuda-graph"])
    assert server_command("/m", 30010, cfg, base_gpu_id=2, python="py") == [
        "py", "-m", "sglang.launch_server", "--model-path", "/m", "--host", "127.0.0.1",
        "--port", "30010", "--tp-size", "2", "--mem-fraction-static", "0.6", "--base-gpu-id", "2",
        "--enable-memory-saver", "--disable-cuda-graph"]  # colocation: release/resume memory
    cfg.memory_saver = False
    assert "--enable-memory-saver" not in server_command("/m", 30010, cfg)
    assert router_command(["http://a:1", "http://b:2"], 29000, python="py") == [
        "py", "-m", "sglang_router.launch_router", "--worker-urls", "http://a:1", "http://b:2",
        "--host", "127.0.0.1", "--port", "29000", "--policy", "cache_aware",
        "--prometheus-host", "127.0.0.1", "--prometheus-port", "29001"]


def test_launch_fails_fast_with_the_log_of_a_dying_server(tmp_path):
    cfg = SGLangConfig(servers_per_node=1, port_base=_free_port())
    with pytest.raises(RolloutError, match=r"(?s)sglang-server-0-0 exited with code 3 .*boom"):
        launch_server_group("unused", cfg, log_dir=tmp_path, startup_timeout_s=60,
                            server_cmd=lambda port, gpu: [sys.executable, "-c",
                                                          "print('boom'); raise SystemExit(3)"])


@pytest.mark.skipif(not HAS_ROUTER, reason="sglang-router is not installed")
def test_real_router_over_two_fake_servers_and_nccl_path_on_gloo(model_dir, tmp_path):
    cfg = SGLangConfig(servers_per_node=2, port_base=free_port_block(2), router_port=_free_port(),
                       request_timeout_s=60, max_retries=1, max_concurrency=4)
    group = launch_server_group(str(model_dir), cfg, log_dir=tmp_path, startup_timeout_s=240,
                                port_stride=1, server_cmd=_fake_cmd(model_dir))
    sync = DistributedSync("127.0.0.1", _free_port(), backend="gloo", bucket_mb=8192 / 2**20,
                           timeout_s=120)
    engine = SGLangEngine(group.router_url, None, config=cfg, servers=group, weight_sync=sync)
    try:
        assert sorted(engine.router_workers()) == sorted(group.worker_urls)
        assert engine.health()
        prompts = [[5, 6, 7], [9, 10], [20], [30, 31]]
        samples = engine.generate([GenerateRequest(f"p{i}", p, SamplingParams(0.0, max_new_tokens=6))
                                   for i, p in enumerate(prompts)])
        reference = tiny_model(0)
        assert [s.response_ids for s in samples] == \
            [greedy_reference(reference, p, 6, {EOS}) for p in prompts]

        gen = torch.Generator().manual_seed(3)
        state = {n: t + 0.25 * torch.randn(t.shape, generator=gen)
                 for n, t in reference.state_dict().items() if n != "lm_head.weight"}
        engine.update_weights(state.items())  # broadcast from this process to both servers
        engine.check_weights(state.items())
        logs = [engine.http.get(f"{u}/_fake/requests") for u in engine.worker_urls()]
        offsets = []
        for log in logs:
            init = next(r["body"] for r in log if r["path"] == "/init_weights_update_group")
            assert set(init) == {"master_address", "master_port", "rank_offset", "world_size",
                                 "group_name", "backend"}
            assert init["world_size"] == 3 and init["backend"] == "gloo"
            assert init["group_name"] == "weight_update_group_pp0"
            offsets.append(init["rank_offset"])
            bodies = [r["body"] for r in log if r["path"] == "/update_weights_from_distributed"]
            assert len(bodies) > 1 and set(bodies[0]) == {"names", "dtypes", "shapes", "group_name",
                                                          "flush_cache", "weight_version"}
            assert bodies[0]["dtypes"][0] == "float32" and bodies[0]["weight_version"] == "1"
            assert sum(len(b["names"]) for b in bodies) == len(state)
        assert sorted(offsets) == [1, 2]
        changed = engine.generate([GenerateRequest("q", prompts[0], SamplingParams(0.0, max_new_tokens=6))])
        reference.load_state_dict(state, strict=False)
        assert changed[0].response_ids == greedy_reference(reference, prompts[0], 6, {EOS})
    finally:
        engine.close()
    assert not any(p.alive() for p in group.servers) and not group.router.alive()
