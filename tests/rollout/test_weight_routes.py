"""Weight sync along every route, streamed per pipeline stage, into real processes: fake SGLang servers
started by the placement (IPC buckets per node, a gloo update group per PP stage, a shared directory)
or rank 0's embedded engine. The servers must end up holding exactly the actor's weights.

"Two nodes" without namespaces: two torchrun agents (``--nnodes 2``, one rank each) rendezvous on
loopback, each node with its own loopback address (127.0.0.1 / 127.0.0.2) for its servers — the case
where a node leader is also a TP peer of the stage sender (its gathers and the broadcasts in step).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist.actor_worker import write_hf_checkpoint
from tests.dist.mg_common import free_port

REPO = Path(__file__).resolve().parents[2]
FAKE = ["rollout.engine=sglang", "rollout.sglang.servers_per_node=1", "rollout.sglang.check_weights=true",
        "rollout.sglang.server_module=tests.doubles.fake_sglang", "rollout.sglang.sync_bucket_mb=1",
        "rollout.sglang.request_timeout_s=120", "rollout.sglang.startup_timeout_s=240",
        "rollout.sglang.extra_args=[--max-lifetime-s,'400']"]  # a killed test leaves no server behind


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("route-hf") / "hf")


def _ports() -> list[str]:
    return [f"rollout.sglang.port_base={free_port()}", f"rollout.sglang.router_port={free_port()}",
            f"rollout.sglang.sync_port_base={free_port()}"]


def _env(**extra) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                CUDA_VISIBLE_DEVICES="", **extra)


def _run(hf: Path, out: Path, overrides: list[str], nodes: int = 1, nproc: int = 2) -> dict:
    worker = str(REPO / "tests" / "dist" / "weight_route_worker.py")
    args = ["--hf", str(hf), "--out", str(out), *overrides]
    if nodes == 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", worker, *args]
        procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)]
    else:
        port = free_port()
        procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}",
                                   f"--nproc-per-node={nproc}", f"--node-rank={n}", "--master-addr=127.0.0.1",
                                   f"--master-port={port}", worker, *args],
                                  env=_env(DELTA_MEGATRON_NODE_ADDR=f"127.0.0.{n + 1}"),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  start_new_session=True)
                 for n in range(nodes)]
    try:
        logs = [p.communicate(timeout=420)[0] for p in procs]
    finally:
        for p in procs:  # a hung run: stop its process group (torchrun and its ranks)
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert all(p.returncode == 0 for p in procs), "\n----\n".join(log[-6000:] for log in logs)
    return json.loads((out / "result.json").read_text())


@pytest.mark.dist
@pytest.mark.slow
def test_pp2_stages_stream_along_every_route(hf, tmp_path):
    res = _run(hf, tmp_path, ["parallel.pp=2", "--routes", "embedded,auto,distributed,disk", *FAKE, *_ports()])
    for route, got in res.items():
        assert got["names"] == got["expected"], route
        assert got["max_diff"] <= 1e-6, route  # fp32 copy of checkpoint + 0.125
    assert res["embedded"]["consumed"] == len(res["embedded"]["expected"])  # rank 0 got every tensor once
    assert res["auto"]["workers"][0].startswith("http://127.0.0.1:")


@pytest.mark.dist
@pytest.mark.slow
def test_two_loopback_nodes_tp2_colocated_ipc_per_node(hf, tmp_path):
    """Node 1's leader is the TP peer of stage 0's sender and a receiver of its buckets."""
    res = _run(hf, tmp_path, ["parallel.tp=2", *FAKE, *_ports()], nodes=2, nproc=1)["auto"]
    assert res["max_diff"] <= 1e-6 and res["names"] == res["expected"]
    hosts = sorted(u.split("//")[1].split(":")[0] for u in res["workers"])
    assert hosts == ["127.0.0.1", "127.0.0.2"]  # one server per node, on the node's address
