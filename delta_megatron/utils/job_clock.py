"""The scheduler's deadline: when the batch job will be killed, so the trainer can save before it.

Slurm >= 23.02 exports ``SLURM_JOB_END_TIME`` (epoch seconds) into the job; older versions (the
local test cluster runs 22.05) answer ``squeue -h -j $SLURM_JOB_ID -o %L``, the time left as
``[days-]hours:minutes:seconds`` (or ``minutes:seconds``). Outside a job, or for a job without a
time limit, there is no deadline.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Mapping


def parse_time_left(text: str) -> float | None:
    """``1-02:03:04`` / ``02:03:04`` / ``03:04`` / ``45`` → seconds; ``UNLIMITED``, ``NOT_SET``,
    ``INVALID`` or anything unparsable → None."""
    text = text.strip()
    days, _, clock = text.rpartition("-") if "-" in text else ("0", "", text)
    try:
        parts = [int(p) for p in clock.split(":")]
        if not 1 <= len(parts) <= 3 or any(p < 0 for p in parts):
            return None
        seconds = 0
        for p in parts:
            seconds = seconds * 60 + p
        return float(int(days) * 86400 + seconds)
    except ValueError:
        return None


def job_end_time(env: Mapping[str, str] | None = None,
                 run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
                 now: Callable[[], float] = time.time) -> float | None:
    """Epoch seconds at which the current Slurm job ends, or None (no job, no limit, no answer)."""
    env = os.environ if env is None else env
    end = env.get("SLURM_JOB_END_TIME")
    if end and end.strip().isdigit() and int(end) > 0:
        return float(end)
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    left = parse_time_left(out.stdout) if out.returncode == 0 else None
    return None if left is None else now() + left
