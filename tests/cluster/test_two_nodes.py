"""The real pipeline as a two-node cluster on this machine (slurm/local/cluster2.sh: network namespaces
dm-node1 = 10.77.0.1 and dm-node2 = 10.77.0.2, ``torchrun --nnodes 2`` across them; CPU, gloo).

Tiny recipe (pipelines.tiny_arith_cpu:smoke_config after a short supervised warm-up, so groups carry
advantages), 3 steps, SGLang engine on the SGLang-protocol test server (a real HF model behind it),
``check_weights`` on: every weight sync is read back from every server.

* colocated, 2 nodes × 2 ranks (TP 2, DP 2 across the nodes): each node's local rank 0 starts its own
  server on its own address, rank 0 the router; weights go to each node's server by IPC from that
  node's leader; each DP leader fetches its own prompt groups through the router.
* disaggregated: node 1 trains (PP 2), node 2 only serves (``delta_megatron.cli_serve``); each pipeline
  stage's sender pushes its layers over a gloo update group across the namespaces.
* SIGKILL of every process of node 2 in step 2: node 1 fails fast (well inside the 2-minute
  collective timeout) with an error that says what happened; ``--resume auto`` on both nodes continues
  from the step-1 checkpoint and reproduces the uninterrupted run.
* Both 2-node layouts equal the single-process run (same seeds): per-step losses, λ̄ statistics, rewards
  (relative 1e-5) and the final weights (absolute 1e-5), read from the checkpoints.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from tests.cluster.harness import (
    BASE,
    COMPARED,
    NODE_ADDR,
    RECIPE,
    SCRIPT,
    Run,
    cluster_up,
    export,
    require,
    start,
    train_cmd,
    two_node_train,
    write_hf,
)
from tests.dist.mg_common import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
REL = 1e-5  # metrics: |a - b| <= REL * max(1, |a|)
ATOL_WEIGHTS = 1e-5


@pytest.fixture(scope="module")
def cluster():
    require(cluster_up(), "the two-node cluster is not available (sudo slurm/local/cluster2.sh up)")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return write_hf(tmp_path_factory.mktemp("cluster-hf") / "hf")


@pytest.fixture(scope="module")
def reference(hf, tmp_path_factory):
    """The same recipe in one process on this host (one server on 127.0.0.1)."""
    out = tmp_path_factory.mktemp("one-process")
    ports = [f"rollout.sglang.port_base={free_port()}", f"rollout.sglang.router_port={free_port()}"]
    run = Run(out)
    run.logs[0] = out / "node.log"
    run.procs[0] = start(None, train_cmd(1, 1, 0, "127.0.0.1", free_port(), out, hf, ports), run.logs[0])
    assert run.wait(900) == {0: 0}, run.log(0)[-6000:]
    return run


@pytest.fixture(scope="module")
def colocated(cluster, hf, tmp_path_factory):
    run = two_node_train(tmp_path_factory.mktemp("colocated"), hf, ["parallel.tp=2"])
    codes = run.wait(900)
    assert codes == {1: 0, 2: 0}, run.log(1)[-6000:] + run.log(2)[-6000:]
    return run


def _close(a: dict, b: dict, keys=COMPARED) -> list[str]:
    return [f"step {a['step']} {k}: {a[k]} vs {b[k]}" for k in keys
            if abs(a[k] - b[k]) > REL * max(1.0, abs(a[k]))]


def test_colocated_each_node_serves_on_its_address_and_syncs_its_servers(colocated):
    logs = colocated.out / "sglang"
    for node, addr in NODE_ADDR.items():  # started by that node's local rank 0, bound to its address
        assert f"FAKE_SGLANG_READY http://{addr}:30000" in (logs / f"sglang-server-{node - 1}-0.log").read_text()
    assert "Starting router on 10.77.0.1:29000" in (logs / "sglang-router.log").read_text()
    assert "placement colocated: 2 node(s) x 2 GPU(s), weight sync ipc" in colocated.log(1)
    rows = colocated.metrics()
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["rollout/num_samples"] == 32 and r["credit/delta/degenerate"] == 0.0 for r in rows)


def test_two_nodes_equal_one_process(colocated, reference, tmp_path):
    ref, got = reference.metrics(), colocated.metrics()
    assert len(ref) == len(got) == 3
    bad = [m for a, b in zip(ref, got) for m in _close(a, b)]
    assert not bad, bad
    assert any(abs(r["train/pg_loss"]) > 1e-4 for r in ref)  # the comparison is not of zeros
    w_ref, w_got = export(reference.out, tmp_path / "ref"), export(colocated.out, tmp_path / "two")
    assert w_ref.keys() == w_got.keys()
    diff = max(float((w_ref[n] - w_got[n]).abs().max()) for n in w_ref)
    assert diff <= ATOL_WEIGHTS, diff
    hf0 = export(reference.out / "checkpoints" / "step_00000001", tmp_path / "ref1")  # training moved them
    assert max(float((hf0[n] - w_ref[n]).abs().max()) for n in w_ref) > 1e-4


def test_disaggregated_trainer_node_and_serving_node(cluster, hf, reference, tmp_path):
    overrides = ["parallel.pp=2", "rollout.placement=disaggregated", "rollout.nodes=1"]
    hosts = {"DELTA_MEGATRON_ROLLOUT_HOSTS": NODE_ADDR[2]}
    run = Run(tmp_path)
    run.logs[2] = tmp_path / "serve.log"
    run.procs[2] = start(2, [sys.executable, "-m", "delta_megatron.cli_serve", "--recipe", RECIPE, "--actor-nodes", "1",
                             "--gpus-per-node", "2", f"logging.dir={tmp_path}", f"model.hf_path={hf}", *BASE,
                             *overrides], run.logs[2], hosts)
    run.logs[1] = tmp_path / "node1.log"
    run.procs[1] = start(1, train_cmd(1, 2, 0, NODE_ADDR[1], free_port(), tmp_path, hf, overrides), run.logs[1],
                         hosts)
    try:
        code = run.procs[1].wait(900)
    finally:
        run.kill()
    assert code == 0, run.log(1)[-6000:] + run.log(2)[-3000:]
    assert "SERVING node 1 (10.77.0.2): http://10.77.0.2:30000; router http://10.77.0.2:29000" in run.log(2)
    assert "pp stage 1: sender rank 1 (node 0) -> group dm_weights_pp1 at 10.77.0.1:29101" in run.log(1)
    bad = [m for a, b in zip(reference.metrics(), run.metrics()) for m in _close(a, b)]
    assert len(run.metrics()) == 3 and not bad, bad


def test_sigkill_of_a_node_fails_fast_then_resume_continues(cluster, hf, colocated, tmp_path):
    run = two_node_train(tmp_path, hf, ["parallel.tp=2"])
    first = tmp_path / "checkpoints" / "step_00000001"
    deadline = time.monotonic() + 900
    while not first.exists() and time.monotonic() < deadline and all(p.poll() is None for p in run.procs.values()):
        time.sleep(0.2)
    assert first.exists(), run.log(1)[-4000:]
    pids = subprocess.run(["bash", str(SCRIPT), "pids", "2"], capture_output=True, text=True).stdout.split()
    t_kill = time.monotonic()
    subprocess.run(["kill", "-9", *pids], check=False)  # every process of node 2: ranks, torchrun, server
    code = run.procs[1].wait(timeout=300)
    failed_after = time.monotonic() - t_kill
    run.kill()
    log = run.log(1)
    assert code != 0 and failed_after < 90, (code, failed_after)  # the collective timeout is 120 s
    assert "delta-megatron: rank" in log and "failed. A process of another node that died" in log
    assert len(run.metrics()) < 3
    for pid in subprocess.run(["bash", str(SCRIPT), "pids", "1"], capture_output=True, text=True).stdout.split():
        subprocess.run(["kill", "-9", pid], check=False)  # what Slurm does to the rest of a failed job step

    resumed = two_node_train(tmp_path, hf, ["parallel.tp=2"], resume=True, port=29401)
    assert resumed.wait(900) == {1: 0, 2: 0}, resumed.log(1)[-6000:]
    rows = resumed.metrics()
    assert [r["step"] for r in rows][-2:] == [1, 2] and len({r["step"] for r in rows}) == 3
    done = {r["step"]: r for r in rows}  # the resumed steps reproduce the uninterrupted run
    bad = [m for a in colocated.metrics() for m in _close(a, done[a["step"]])]
    assert not bad, bad
    # every rank restored its own RNG state: NumPy's generator is seeded per rank (and nothing but
    # our code draws from it), so the NumPy states every rank ends with match the uninterrupted
    # run's only if each rank got its own back (rank 0's applied to all: ranks 1-3 would differ);
    # torch's (one seed on every rank, as megatron expects) matches too. Python's generator is per
    # rank as well, but third-party code on rank 0's SGLang path draws from it at times we do not
    # control, so only its per-rank seeding is asserted.
    def states(run_dir):
        return [torch.load(run_dir / "checkpoints" / "step_00000003" / f"rng_rank{r:05d}.pt", weights_only=False)
                for r in range(4)]

    mine, uninterrupted = states(tmp_path), states(colocated.out)
    assert len({str(s["python"][1][:8]) for s in mine}) == 4
    assert len({tuple(s["numpy"][1][:8].tolist()) for s in mine}) == 4
    for a, b in zip(mine, uninterrupted):
        assert (a["numpy"][1] == b["numpy"][1]).all() and a["numpy"][2] == b["numpy"][2]
        assert torch.equal(a["torch"], b["torch"])
