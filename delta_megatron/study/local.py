"""Run a study's runs on this machine: a bounded pool of trainer processes, one thread each.

Each run is its own ``python -m delta_megatron.train --config run.yaml --resume auto`` process (its own
session, so a Ctrl-C of the terminal reaches only the study, which then asks every run to checkpoint
and stop: SIGTERM, the trainer's preemption signal, exit code 75). ``jobs`` processes run at once,
with ``OMP_NUM_THREADS=1``: on a small machine, more threads than cores made steps ~10× slower
(docs/benchmarks.md). A run that fails is recorded (``status.json`` with its exit code and the tail of
``train.log``) and the study goes on. Wall time and the CPU time of each run (``wait4`` rusage:
the trainer and every process it waited for) are recorded too: that is how docs/study.md sized the
CPU study.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from delta_megatron.study.plan import RunSpec, fmt_seconds, read_status, steps_done, write_status
from delta_megatron.utils.preemption import REQUEUE_EXIT_CODE

REPO_ROOT = Path(__file__).resolve().parents[2]
STOP_GRACE_S = 120.0  # how long stopped runs get to write their checkpoint before SIGKILL


def default_jobs() -> int:
    """One run per usable core."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def train_command(spec: RunSpec) -> list[str]:
    return [sys.executable, "-m", "delta_megatron.train", "--config", str(Path(spec.dir) / "run.yaml"),
            "--resume", "auto"]


def run_env() -> dict[str, str]:
    """One thread per run, and this checkout on the path (the runs train the code the study runs)."""
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


@dataclass
class Outcome:
    state: str  # done | failed | interrupted
    rc: int
    wall_s: float
    cpu_s: float


@dataclass
class _Running:
    spec: RunSpec
    proc: subprocess.Popen
    log: object
    t0: float
    resumed_from: int


class _Stop:
    """SIGINT/SIGTERM to the study: stop starting runs and ask the running ones to checkpoint."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def run_pool(specs: list[RunSpec], jobs: int, on_change: Callable[[dict], None] | None = None,
             command: Callable[[RunSpec], list[str]] | None = None, poll_s: float = 0.5
             ) -> dict[str, Outcome]:
    """Run ``specs`` (each with its ``run.yaml`` written) at most ``jobs`` at a time. ``on_change``
    gets a snapshot ``{"done", "failed", "interrupted", "pending": [...], "running": [(spec, step,
    seconds)]}`` whenever something changes, and about once a second. ``command``: the process of a
    run (default :func:`train_command`)."""
    command = command or train_command
    pending = list(specs)
    running: dict[int, _Running] = {}
    outcomes: dict[str, Outcome] = {}
    env = run_env()
    last_shown = 0.0
    with _Stop() as stop:
        while pending or running:
            while pending and len(running) < jobs and not stop.requested:
                spec = pending.pop(0)
                item = _start(spec, command(spec), env)
                running[item.proc.pid] = item
            changed = False
            for pid in list(running):
                waited, status, usage = os.wait4(pid, os.WNOHANG)
                if waited == 0:
                    continue
                item = running.pop(pid)
                item.proc.returncode = os.waitstatus_to_exitcode(status)
                outcomes[item.spec.name] = _finish(item, usage.ru_utime + usage.ru_stime)
                changed = True
            if stop.requested and running:
                _stop_all(running, outcomes)
                pending.clear()
            now = time.monotonic()
            if on_change and (changed or now - last_shown >= 1.0):
                on_change(_snapshot(outcomes, pending, running, now))
                last_shown = now
            if running:
                time.sleep(poll_s)
    if on_change:
        on_change(_snapshot(outcomes, pending, running, time.monotonic()))
    if stop.requested:
        raise KeyboardInterrupt
    return outcomes


def _start(spec: RunSpec, cmd: list[str], env: dict[str, str]) -> _Running:
    run_dir = Path(spec.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resumed_from = steps_done(run_dir)
    log = open(run_dir / "train.log", "a", encoding="utf-8")
    log.write(f"\n=== {time.strftime('%F %T')} start{f' (resume after step {resumed_from})' if resumed_from else ''}"
              f": {' '.join(cmd)}\n")
    log.flush()
    prior = read_status(run_dir)
    write_status(run_dir, state="running", attempts=prior.get("attempts", 0) + 1,
                 wall_s=prior.get("wall_s", 0.0), cpu_s=prior.get("cpu_s", 0.0))
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    return _Running(spec, proc, log, time.monotonic(), resumed_from)


def _finish(item: _Running, cpu_s: float) -> Outcome:
    item.log.close()
    rc, wall = item.proc.returncode, time.monotonic() - item.t0
    prior = read_status(item.spec.dir)
    complete = steps_done(item.spec.dir) >= item.spec.steps
    state = "done" if rc == 0 and complete else "interrupted" if rc in (REQUEUE_EXIT_CODE, -15) else "failed"
    if rc == 0 and not complete:
        state = "failed"  # exited cleanly without reaching the last step: nothing will fix that by retrying
    wall_total, cpu_total = prior.get("wall_s", 0.0) + wall, prior.get("cpu_s", 0.0) + cpu_s
    status = dict(state=state, rc=rc, attempts=prior.get("attempts", 1), wall_s=wall_total, cpu_s=cpu_total,
                  last_attempt_wall_s=wall, last_attempt_cpu_s=cpu_s, finished_at=time.strftime("%F %T"))
    if state == "failed":
        status["log_tail"] = _tail(Path(item.spec.dir) / "train.log")
    write_status(item.spec.dir, **status)
    return Outcome(state, rc, wall_total, cpu_total)


def _stop_all(running: dict[int, _Running], outcomes: dict[str, Outcome]) -> None:
    """SIGTERM every run's process group (the trainer saves a checkpoint and exits 75), then wait;
    SIGKILL what is left after the grace period."""
    for item in running.values():
        _signal_group(item.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while running and time.monotonic() < deadline:
        for pid in list(running):
            waited, status, usage = os.wait4(pid, os.WNOHANG)
            if waited:
                item = running.pop(pid)
                item.proc.returncode = os.waitstatus_to_exitcode(status)
                outcomes[item.spec.name] = _finish(item, usage.ru_utime + usage.ru_stime)
        time.sleep(0.2)
    for pid in list(running):
        _signal_group(pid, signal.SIGKILL)
        _, status, usage = os.wait4(pid, 0)
        item = running.pop(pid)
        item.proc.returncode = os.waitstatus_to_exitcode(status)
        outcomes[item.spec.name] = _finish(item, usage.ru_utime + usage.ru_stime)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the run's own session: the trainer and the helpers it started
    except ProcessLookupError:
        pass


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _snapshot(outcomes, pending, running, now) -> dict:
    by_state: dict[str, list[str]] = {"done": [], "failed": [], "interrupted": []}
    for name, o in outcomes.items():
        by_state[o.state].append(name)
    return {**by_state, "pending": [s.name for s in pending],
            "running": [(r.spec, steps_done(r.spec.dir), now - r.t0) for r in running.values()]}


# ----------------------------------------------------------------------------- progress display
class Progress:
    """The study's progress: a live table on a terminal, one line per change otherwise (logs)."""

    def __init__(self, total: int, skipped: int, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.total, self.skipped = total, skipped
        self.live = None
        self._last_line = ""
        self._reported: set[str] = set()

    def __enter__(self):
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)

    def headline(self, snap: dict) -> str:
        done = len(snap["done"]) + self.skipped
        return (f"runs {self.total}: {done} done ({self.skipped} earlier), {len(snap['running'])} running, "
                f"{len(snap['failed'])} failed, {len(snap['interrupted'])} interrupted, "
                f"{len(snap['pending'])} pending")

    def __call__(self, snap: dict) -> None:
        line = self.headline(snap)
        if self.live is None:
            if line != self._last_line:
                self.console.print(line, highlight=False)
                for name in sorted(set(snap["failed"]) - self._reported):
                    self.console.print(f"  failed: {name} (see its train.log / status.json)", highlight=False)
                self._reported |= set(snap["failed"])
                self._last_line = line
            return
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(show_edge=False)
        table.add_column("running")
        table.add_column("step", justify="right")
        table.add_column("time", justify="right")
        for spec, step, seconds in snap["running"]:
            table.add_row(spec.name, f"{step}/{spec.steps}", fmt_seconds(seconds))
        for name in snap["failed"]:
            table.add_row(f"[red]failed: {name}[/red]", "", "")
        self.live.update(Group(Text(line, style="bold"), table))
