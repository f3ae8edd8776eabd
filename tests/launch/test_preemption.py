"""delta_megatron.utils.preemption: a signal sets the flag, nothing else; handlers are restored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from delta_megatron.utils.preemption import REQUEUE_EXIT_CODE, Preemption, restart_count

REPO = Path(__file__).resolve().parents[2]


def test_signal_sets_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with Preemption() as preempt:
        assert not preempt.requested and not preempt.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preempt.requested and preempt.should_stop() and preempt.received == "SIGUSR1"
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal keeps the first reason
        assert preempt.received == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_restart_count(monkeypatch):
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert restart_count() == 0
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert restart_count() == 3


@pytest.mark.dist
def test_flag_is_reduced_over_ranks(tmp_path):
    """Two gloo ranks; only rank 1 is signalled; both stop at the same step and exit 75."""
    script = tmp_path / "two_ranks.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys
        import torch.distributed as dist
        from delta_megatron.utils.preemption import Preemption, REQUEUE_EXIT_CODE
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        with Preemption() as p:
            for step in range(10):
                if step == 3 and rank == 1:
                    os.kill(os.getpid(), signal.SIGUSR1)
                if p.should_stop():
                    print(f"rank {rank} stops at step {step} ({p.received})", flush=True)
                    dist.barrier()  # both have printed before torchrun reaps either
                    dist.destroy_process_group()
                    sys.exit(REQUEUE_EXIT_CODE)
        sys.exit(0)
    """))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", "29631", str(script)]
    out = subprocess.run(torchrun, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
    assert "rank 0 stops at step 3 (peer)" in out.stdout, out.stdout + out.stderr
    assert "rank 1 stops at step 3 (SIGUSR1)" in out.stdout
    assert f"exitcode  : {REQUEUE_EXIT_CODE}" in out.stderr  # torchrun reports the workers' code
