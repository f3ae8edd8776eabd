"""The batch-shell preemption lines, run by bash with fake ``srun``/``scancel``/``scontrol`` on PATH:
SIGUSR1 during a step -> the steps are signalled -> the step exits 75 -> the job is requeued once;
a trainer that stopped by itself (its deadline) leaves the requeue marker, which torchrun's exit code
1 cannot hide."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launchers.requeue import batch_setup_lines, parse_signal, torchrun_env

FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$LOG"
for _ in $(seq 1 600); do
  [ -f "$DIR/flag" ] && exit 75          # the 'trainer' saw SIGUSR1: saved, asks for a requeue
  [ -f "$DIR/stopped" ] && { echo 4242 > "$DIR/requeue"; exit 1; }  # ... by the marker, under torchrun
  [ -f "$DIR/finish" ] && exit "$(cat "$DIR/finish")"
  sleep 0.05
done
exit 3
"""
FAKE_SCANCEL = '#!/bin/bash\necho "scancel $*" >> "$LOG"\ntouch "$DIR/flag"\n'
FAKE_SCONTROL = '#!/bin/bash\necho "scontrol $*" >> "$LOG"\n'


def batch_script(tmp_path: Path, signal_name: str | None = "USR1") -> subprocess.Popen:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "batch.sh"
    lines = batch_setup_lines(signal_name, marker=str(tmp_path / "requeue"))
    script.write_text("set +e\n" + lines + "\nsrun --output x torchrun train\n"
                      'echo "after srun rc=$?" >> "$LOG"\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", LOG=str(tmp_path / "log"),
               DIR=str(tmp_path), SLURM_JOB_ID="4242")
    return subprocess.Popen(["bash", str(script)], env=env)


def wait_for_line(log: Path, text: str, proc: subprocess.Popen) -> None:
    for _ in range(400):
        if log.exists() and text in log.read_text():
            return
        assert proc.poll() is None, log.read_text() if log.exists() else "no log"
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {log}")


def test_sigusr1_signals_steps_then_requeues(tmp_path):
    proc = batch_script(tmp_path)
    wait_for_line(tmp_path / "log", "srun --output x torchrun train", proc)
    proc.send_signal(signal.SIGUSR1)  # what slurmctld does for --signal=B:USR1@120
    assert proc.wait(timeout=30) == 0
    assert (tmp_path / "log").read_text().splitlines() == [
        "srun --output x torchrun train",
        "scancel --quiet --signal=USR1 4242",  # delivered while the step still runs
        "after srun rc=0",  # a stop for a requeue is not a crash (no crash retry on top)
        "scontrol requeue 4242",
    ]


@pytest.mark.parametrize("step_rc, requeued", [(0, False), (1, False), (75, True)])
def test_requeue_only_when_asked(tmp_path, step_rc, requeued):
    proc = batch_script(tmp_path)
    wait_for_line(tmp_path / "log", "srun --output x torchrun train", proc)
    (tmp_path / "finish").write_text(str(step_rc))
    proc.wait(timeout=30)
    lines = (tmp_path / "log").read_text().splitlines()
    assert lines[1] == f"after srun rc={0 if requeued else step_rc}"
    assert ("scontrol requeue 4242" in lines) is requeued and "scancel" not in " ".join(lines)


@pytest.mark.parametrize("signal_name", ["USR1", None])
def test_the_trainers_marker_requeues_through_torchruns_exit_code(tmp_path, signal_name):
    """A deadline stop: no signal, the step exits 1 (torchrun), the marker asks for the requeue."""
    proc = batch_script(tmp_path, signal_name)
    wait_for_line(tmp_path / "log", "srun --output x torchrun train", proc)
    (tmp_path / "stopped").touch()
    assert proc.wait(timeout=30) == 0
    assert (tmp_path / "log").read_text().splitlines() == [
        "srun --output x torchrun train", "after srun rc=0", "scontrol requeue 4242"]
    assert not (tmp_path / "requeue").exists()  # consumed: the next run starts clean


def test_signal_spec_and_torchrun_env():
    assert parse_signal("B:USR1@120") == (True, "USR1", 120)
    assert parse_signal("USR2@30") == (False, "USR2", 30)
    with pytest.raises(ValueError):
        parse_signal("USR1")
    assert torchrun_env(120) == {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
                                 "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "120"}
