"""DelTA λ̄ is identical under DP / CP / SP-sharded-TP token layouts (torchrun, gloo, CPU).

The worker (tests/dist/delta_worker.py) writes per-rank max errors against the single-process
reference; here we assert them. One launch per world size checks every layout, mode and ablation.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "tests" / "dist" / "delta_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, out: Path) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.mark.dist
@pytest.mark.parametrize("nproc", [2, pytest.param(4, marks=pytest.mark.slow)])  # 4: + megatron groups
def test_delta_layout_invariance(nproc, tmp_path):
    results = launch(nproc, tmp_path)
    for rank, res in enumerate(results):
        for layout in ("dp", "cp", "tp_seq"):
            for case in ("cache", "moments", "recompute", "recompute_K3", "moments_K0", "cache_within",
                         "cache_hard", "cache_vs_moments", "cache_vs_recompute"):
                assert res[f"{layout}/{case}"] < 1e-6, (rank, layout, case, res[f"{layout}/{case}"])
            # selections are masks: number of tokens that differ from the single-process mask
            assert res[f"{layout}/moments_top50"] == 0 and res[f"{layout}/recompute_bottom50"] == 0
            assert res[f"{layout}/fp32"] < 1e-6
            assert res[f"{layout}/local_scope"] < 1e-6  # per-rank scope = reference on the shard
            assert res[f"{layout}/local_vs_global"] > 1e-3  # ... which is not the global result
            assert res[f"{layout}/n_pos"] == res["n_pos_ref"]  # global counts, each token once
        if nproc == 4:
            for case in ("global_sp", "global_gathered", "dp_shard_sp"):
                assert res[f"mcore/{case}"] < 1e-6, (rank, case)
            assert res["mcore/global_sp_n_pos"] == res["n_pos_ref"]
            assert res["mcore/global_gathered_n_pos"] == res["n_pos_ref"]  # TP not double counted
            assert res["mcore/group_sizes"] == 4 * 10 + 2
