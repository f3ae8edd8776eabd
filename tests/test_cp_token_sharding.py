"""CP=2 and CP=4 token sharding (load-balanced chunks) gives the CP=1 log-probs, DelTA λ̄, loss and
LM-head gradient (1e-10, float64) — with DelTA statistics, GSPO's per-sequence ratio and FIPO's
future-KL suffix sums reduced over the CP group. The same launches check the fidelity.md examples on
2 and 4 ranks, as CP chunks and as DP shards, against the hand numbers (1e-5): FIPO with a dropped
response (kept / all normaliser), the rollout corrections and their metrics, and the PPL low-prob
variants with prompt groups spanning the ranks."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.dist
@pytest.mark.parametrize("cp", [2, 4])
def test_cp_token_sharding_equals_cp1(tmp_path, cp):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "res.pt"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={cp}",
                    f"--master-port={port}", str(ROOT / "tests/dist/cp_worker.py"), str(out)],
                   cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                   check=True, timeout=300, capture_output=True)
    results = torch.load(out)
    assert set(results["cp"]) == {"ppo", "gspo", "fipo"}
    for loss_name, errors in results["cp"].items():
        assert max(errors) < 1e-10, (loss_name, dict(zip(["logp", "lambda_bar", "grad", "loss"], errors)))
    fidelity = results["fidelity"]
    cases = {"fipo-kept", "fipo-all", "none", "tis", "icepop", "seq-mask-tis", "metrics-none", "metrics-tis",
             "metrics-icepop", "metrics-seq-mask-tis"}
    ppl = {"ppl", "ppl-norm", "ppl-norm-clamp"}
    assert set(fidelity) == {f"{layout}/{c}" for layout in ("cp", "dp") for c in cases} | {
        f"dp/lowprob-{v}" for v in ppl} | {f"{layout}/lowprob-owned-{v}" for layout in ("cp", "dp") for v in ppl}
    assert max(fidelity.values()) < 1e-5, {k: v for k, v in fidelity.items() if v >= 1e-5}
