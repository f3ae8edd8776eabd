"""Live tests on the local Slurm cluster (``slurm/local/setup.sh``): jobs submitted through NeMo-Run's
SlurmExecutor over a LocalTunnel, waited for through sacct, judged by the files they write."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import nemo_run as run
import pytest

from launchers.executors import load_profile, local_executor, slurm_executor
from tests.environment import require

JOBS = Path(__file__).parent / "jobs"


@pytest.fixture
def live():
    """The local Slurm cluster answers (skip without it; CI=true fails instead)."""
    ok = shutil.which("sinfo") is not None and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0
    require(ok, "no local Slurm cluster: run slurm/local/setup.sh first")


def job_id(handle: str) -> str:
    return handle.rstrip("/").rpartition("/")[2]  # slurm_tunnel://nemo_run/<id>


def sacct_states(jid: str) -> list[str]:
    """Every record of the job, requeued incarnations included (-D), oldest first."""
    out = subprocess.run(["sacct", "-X", "-D", "-n", "-P", "-o", "State", "-j", jid],
                         capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _squeue_state(jid: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", jid, "-o", "%T"], capture_output=True,
                          text=True).stdout.strip()


def wait_until(predicate, what: str, timeout_s: float = 240.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def experiment(title: str) -> run.Experiment:
    return run.Experiment(title, log_level="WARN", enable_goodbye_message=False)


@pytest.mark.dist
def test_local_executor_runs_torchrun(tmp_path, nemorun_home):
    out = tmp_path / "metrics.jsonl"
    task = run.Script(path=str(JOBS / "allreduce.py"), entrypoint="python", args=["--out", str(out)])
    with experiment("dm-local-allreduce") as exp:
        exp.add(task, executor=local_executor(2), name="allreduce")
        exp.run(sequential=True)
    (line,) = read_jsonl(out)
    assert (line["world_size"], line["allreduce_sum"]) == (2, 3.0)
    assert sorted(r["local_rank"] for r in line["ranks"]) == [0, 1]


@pytest.mark.slurm
def test_torchrun_job_through_slurm_executor(tmp_path, nemorun_home, live):
    out = tmp_path / "metrics.jsonl"
    executor = slurm_executor(load_profile("local"), nodes=1, name="allreduce")
    task = run.Script(path=str(JOBS / "allreduce.py"), entrypoint="python", args=["--out", str(out)])
    with experiment("dm-live-allreduce") as exp:
        exp.add(task, executor=executor, name="allreduce")
        exp.run(detach=False)  # NeMo-Run polls sacct until the job ends
        jid = job_id(exp.jobs[0].handle)
    assert sacct_states(jid) == ["COMPLETED"]
    (line,) = read_jsonl(out)
    assert (line["world_size"], line["allreduce_sum"]) == (2, 3.0)
    assert {r["slurm_job"] for r in line["ranks"]} == {jid}


@pytest.mark.slurm
def test_preempted_job_checkpoints_requeues_and_resumes(tmp_path, nemorun_home, live):
    steps = 60
    executor = slurm_executor(load_profile("local"), nodes=1, name="requeue")
    task = run.Script(path=str(JOBS / "requeue_job.py"), entrypoint="python",
                      args=["--dir", str(tmp_path), "--steps", str(steps), "--step-s", "0.25"])
    with experiment("dm-live-requeue") as exp:
        exp.add(task, executor=executor, name="requeue")
        exp.run(detach=True)
        jid = job_id(exp.jobs[0].handle)
        log_dir = Path(exp.jobs[0].executor.job_dir)
    progress = tmp_path / "progress.json"
    wait_until(lambda: progress.exists() and json.loads(progress.read_text())["step"] >= 3,
               "the job to reach step 3")
    # exactly what slurmctld does for --signal=B:USR1@60 when the time limit approaches
    subprocess.run(["scancel", "--batch", "--signal=USR1", jid], check=True)
    wait_until(lambda: "REQUEUED" in sacct_states(jid), "the batch script to requeue the job")
    # Slurm holds a requeued job ~2 min (BeginTime); shorten the hold to 5 s. Not to 0: slurmd
    # revokes the old incarnation's credential, and a restart within the same second is refused
    # ("Job credential revoked"), which is what the hold protects against.
    wait_until(lambda: _squeue_state(jid) == "PENDING", "the requeued job to be pending")
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now+5"], check=True)
    metrics = tmp_path / "metrics.jsonl"
    wait_until(lambda: any(e["event"] == "done" for e in read_jsonl(metrics)), "the resumed run")
    wait_until(lambda: sacct_states(jid)[-1:] == ["COMPLETED"], "the job to complete")

    events = read_jsonl(metrics)
    saved = json.loads((tmp_path / "ckpt.json").read_text())
    assert saved["reason"] == "SIGUSR1" and saved["step"] >= 4
    assert [(e["event"], e["restart"]) for e in events] == [
        ("start", 0), ("preempted", 0), ("start", 1), ("done", 1)]
    assert events[0]["start_step"] == 0 and events[1]["saved_step"] == saved["step"]
    assert events[2]["start_step"] == saved["step"]  # resumed from the checkpoint, not from 0
    assert events[3]["final_step"] == steps
    assert sacct_states(jid) == ["REQUEUED", "COMPLETED"]
    batch_log = "".join(p.read_text() for p in log_dir.glob("sbatch_*.out"))
    assert f"delta-megatron: requeueing job {jid} (restart 0)" in batch_log


@pytest.mark.slurm
@pytest.mark.slow
def test_real_trainer_through_slurm(tmp_path, nemorun_home, live):
    from delta_megatron.utils.configs import apply_overrides
    from launchers.launch import launch
    from pipelines.tiny_arith_cpu import config

    cfg = apply_overrides(config(out=str(tmp_path), method="delta", steps=2), [
        "train.prompts_per_step=8", "rollout.n_samples=4", "eval.every=0",
        "logging.tensorboard=false", "parallel.tp=2"])
    result = launch({"tiny": cfg}, executor="slurm", profile=load_profile("local"), nodes=1,
                    title="dm-live-train", detach=True)
    jid = job_id(result.handles[0])
    wait_until(lambda: sacct_states(jid)[-1:] in (["COMPLETED"], ["FAILED"], ["CANCELLED"]),
               "the training job", timeout_s=600)
    assert sacct_states(jid) == ["COMPLETED"]
    rows = read_jsonl(Path(result.exp_dir) / "tiny" / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]


@pytest.mark.slurm
@pytest.mark.slow
def test_job_with_a_short_time_limit_saves_before_it_and_resumes(tmp_path, nemorun_home, live):
    """A 1-minute job (Slurm's smallest limit) of 1.5 s stages: rank 0 reads the end time (squeue %L),
    the job stops once time left < save time (12 s) + longest stage, saves, leaves the requeue
    marker and is requeued by the batch script — never killed by the limit — and each next run
    resumes where the last one saved, until the work (1.5x what the first run fits) is done."""
    profile = load_profile("local")
    profile.slurm.time, profile.slurm.signal = "00:01:00", None  # only the trainer's own deadline rule
    executor = slurm_executor(profile, nodes=1, name="deadline", requeue_marker=str(tmp_path / "requeue"))
    task = run.Script(path=str(JOBS / "deadline_job.py"), entrypoint="python",
                      args=["--dir", str(tmp_path), "--stage-s", "1.5", "--save-s", "12"])
    with experiment("dm-live-deadline") as exp:
        exp.add(task, executor=executor, name="deadline")
        exp.run(detach=True)
        jid = job_id(exp.jobs[0].handle)
    metrics = tmp_path / "metrics.jsonl"
    requeues = 0
    while not any(e["event"] == "done" for e in read_jsonl(metrics)):
        assert requeues < 4, read_jsonl(metrics)  # the work needs one or two requeues at most
        wait_until(lambda seen=requeues: sacct_states(jid).count("REQUEUED") > seen
                   or any(e["event"] == "done" for e in read_jsonl(metrics)), "a stop or the end",
                   timeout_s=150)
        if any(e["event"] == "done" for e in read_jsonl(metrics)):
            break
        requeues += 1
        # Slurm holds a requeued job ~2 min; 5 s is enough for its credential to be revoked
        wait_until(lambda: _squeue_state(jid) == "PENDING", "the requeued job to be pending")
        subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now+5"], check=True)
    wait_until(lambda: sacct_states(jid)[-1:] == ["COMPLETED"], "the job to complete")

    events = read_jsonl(metrics)
    assert requeues >= 1 and [e["event"] for e in events] == ["start", "stopped"] * requeues + ["start", "done"]
    assert [e["restart"] for e in events[::2]] == list(range(requeues + 1))
    for start, stop in zip(events[:-2:2], events[1::2]):
        assert start["end_time"] is not None and 0 < start["time_left"] <= 60  # read from Slurm
        assert stop["reason"] == "deadline" and stop["saved_step"] > start["start_step"]  # progress
        assert 0 < stop["time_left"] < 12 + 2 * 1.5  # below save + longest stage (slack), not after
    for stop, again in zip(events[1::2], events[2::2]):
        assert again["start_step"] == stop["saved_step"]
    assert sacct_states(jid) == ["REQUEUED"] * requeues + ["COMPLETED"]  # never TIMEOUT


@pytest.mark.slurm
@pytest.mark.slow
def test_sigusr1_during_the_rollout_saves_within_one_stage(tmp_path, nemorun_home, live):
    """The real trainer under Slurm (2 ranks): SIGUSR1 through the batch shell while a rollout runs
    (a long one: 128 sequential generations) stops the run at the very next stage boundary — the
    end of that rollout — with a checkpoint that redoes the step, and the batch script requeues."""
    from delta_megatron.utils.configs import apply_overrides
    from launchers.launch import launch
    from pipelines.tiny_arith_cpu import smoke_config

    cfg = apply_overrides(smoke_config(out=str(tmp_path), method="delta", steps=6), [
        "train.prompts_per_step=16", "rollout.n_samples=8", "rollout.batch_size=1", "checkpoint.every=0",
        "logging.progress=false"])
    result = launch({"tiny": cfg}, executor="slurm", profile=load_profile("local"), nodes=1,
                    title="dm-live-sigusr1", detach=True)
    jid = job_id(result.handles[0])
    timeline = Path(result.exp_dir) / "tiny" / "run" / "timeline.jsonl"
    try:
        # the end of step 0: the next rollout starts right away
        wait_until(lambda: any(e["stage"] == "step" for e in read_jsonl(timeline) if e["event"] == "boundary"),
                   "the first step", timeout_s=400)
        subprocess.run(["scancel", "--batch", "--signal=USR1", jid], check=True)
        wait_until(lambda: any(e["event"] == "stop" for e in read_jsonl(timeline)), "the stop", timeout_s=200)
        wait_until(lambda: "REQUEUED" in sacct_states(jid), "the requeue")
    finally:
        subprocess.run(["scancel", jid], check=False)  # the requeued run is not needed here

    events = read_jsonl(timeline)
    stop = next(e for e in events if e["event"] == "stop")
    after = [e for e in events if e["event"] == "boundary" and e["t"] >= stop["signal_at"]]
    assert stop["reason"] == "SIGUSR1" and after[0]["stop"]  # the first boundary after the signal
    assert after[0]["stage"] == stop["stage"] == "rollout" and len(after) == 1
    assert stop["resume_step"] == stop["step"] >= 1  # the interrupted step is redone on resume
    saved = Path(result.exp_dir) / "tiny" / "run" / "checkpoints" / stop["saved"]
    assert (saved / "trainer.pt").exists() and (saved / "actor").is_dir()
