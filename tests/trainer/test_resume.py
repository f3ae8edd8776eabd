"""Full resume: a run SIGKILLed at a random step and restarted with ``--resume auto`` continues exactly as
the uninterrupted run (bit-exact metrics on CPU: model, optimizer, LR schedule, data cursor, RNG, DelTA
state all come back from the atomic checkpoint)."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from delta_megatron.tracking import read_metrics

STEPS = 4
ROOT = Path(__file__).resolve().parents[2]


def _cmd(out: Path, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "delta_megatron.train", "--recipe", "pipelines.tiny_arith_cpu:smoke_config",
           f"logging.dir={out}", f"train.steps={STEPS}", "checkpoint.every=1", "checkpoint.keep=5",
           "data.synthetic_digits=1"]
    return cmd + (["--resume", "auto"] if resume else [])


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time") and k != "reward/seconds"} for r in rows]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(_cmd(ref), env=_env(), cwd=ROOT, check=True, timeout=600, capture_output=True)

    killed = tmp_path / "killed"
    kill_after = random.Random(os.getpid()).choice([1, 2])  # checkpoint step after which we kill
    # its own process group: the kill takes the run's helper processes too, as Slurm does when it
    # kills a job step (a lone SIGKILL of the trainer would orphan them on the CI machine)
    proc = subprocess.Popen(_cmd(killed), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    target = killed / "checkpoints" / f"step_{kill_after:08d}"
    deadline = time.time() + 600
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert target.exists(), "the run never wrote the checkpoint to kill after"
    done_before = len(read_metrics(killed / "metrics.jsonl"))
    assert done_before < STEPS  # it really was interrupted

    subprocess.run(_cmd(killed, resume=True), env=_env(), cwd=ROOT, check=True, timeout=600,
                   capture_output=True)
    a, b = _comparable(read_metrics(ref / "metrics.jsonl")), _comparable(read_metrics(killed / "metrics.jsonl"))
    assert [r["step"] for r in b] == list(range(STEPS))
    assert a == b
