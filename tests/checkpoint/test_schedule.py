"""When to save: the deadline rule (time left < save time + longest stage), the step / wall-clock
cadence, and reading the Slurm job's end time."""

from __future__ import annotations

import subprocess

import pytest

from delta_megatron.checkpoint.config import CheckpointConfig
from delta_megatron.checkpoint.schedule import SaveSchedule
from delta_megatron.utils.job_clock import job_end_time, parse_time_left
from delta_megatron.utils.preemption import Preemption


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_deadline_rule_uses_the_longest_stage_and_the_slowest_save():
    clock = Clock()
    sched = SaveSchedule(CheckpointConfig(save_seconds=20.0), end_time=1000.0 + 300, total_steps=100,
                         clock=clock)
    clock.t += 50
    assert sched.mark("rollout") == 50 and sched.longest == ("rollout", 50)
    clock.t += 10
    sched.mark("optimizer step")
    assert sched.longest == ("rollout", 50) and sched.time_left() == 240
    assert not sched.deadline_near()  # 240 >= 20 + 50
    clock.t += 171  # 69 s left: 69 < 20 + 50
    assert sched.deadline_near()
    sched.saved(40.0)  # a measured save slower than the estimate counts from now on
    assert sched.save_s == 40.0
    sched.saved(5.0)
    assert sched.save_s == 40.0
    assert not SaveSchedule(CheckpointConfig(), end_time=None, total_steps=1, clock=clock).deadline_near()


def test_periodic_cadence_steps_minutes_and_the_last_step():
    clock = Clock()
    sched = SaveSchedule(CheckpointConfig(every=3, every_minutes=10.0), None, total_steps=7, clock=clock)
    assert [s for s in range(7) if sched.periodic_due(s)] == [2, 5, 6]  # every 3 steps and the last
    clock.t += 600
    assert sched.periodic_due(0)  # ten minutes since the start
    sched.saved(1.0)
    assert not sched.periodic_due(0)
    clock.t += 599
    assert not sched.periodic_due(0)
    clock.t += 1
    assert sched.periodic_due(0)


@pytest.mark.parametrize("text, seconds", [("1-02:03:04", 93784), ("02:03:04", 7384), ("03:04", 184),
                                           ("45", 45), ("UNLIMITED", None), ("NOT_SET", None),
                                           ("INVALID", None), ("", None), ("1:-2", None)])
def test_parse_squeue_time_left(text, seconds):
    assert parse_time_left(text) == seconds


def test_job_end_time_from_the_environment_or_squeue():
    assert job_end_time(env={}) is None
    assert job_end_time(env={"SLURM_JOB_END_TIME": "1800000000", "SLURM_JOB_ID": "7"}) == 1800000000.0
    calls = []

    def squeue(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="0:58:30\n", stderr="")

    assert job_end_time(env={"SLURM_JOB_ID": "7"}, run=squeue, now=lambda: 100.0) == 100.0 + 3510
    assert calls == [["squeue", "-h", "-j", "7", "-o", "%L"]]

    def unlimited(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 0, stdout="UNLIMITED\n", stderr="")

    assert job_end_time(env={"SLURM_JOB_ID": "7"}, run=unlimited) is None


def test_decide_agrees_on_flags_and_marks_the_stop():
    p = Preemption()
    assert p.decide(False, True) == (False, False, True)
    p.request("deadline")
    assert p.decide(False) == (True, False) and p.received == "deadline" and p.received_at > 0
