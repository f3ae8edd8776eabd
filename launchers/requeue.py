"""Batch-shell side of preemption: SIGUSR1 -> ask the job steps to checkpoint -> requeue.

``#SBATCH --signal=B:USR1@120`` delivers SIGUSR1 to the *batch shell only*, 120 s before the time
limit. NeMo-Run's sbatch template runs each ``srun`` in the foreground, and bash defers a trap until
the foreground command returns, so a plain ``trap`` would fire only after the job step ended, too late.
These lines (inserted through ``SlurmExecutor.setup_lines``, after the template's ``set +e``) therefore

1. shadow ``srun`` with a function that runs the real ``srun`` in the background and ``wait``s on
   it (a trap interrupts ``wait``), so the trap runs at once;
2. on SIGUSR1 forward the signal to every process of the job's steps (``scancel --signal=USR1``):
   the trainer ranks set their preemption flag (``delta_megatron.utils.preemption``), save and exit
   with code 75; torchrun is told to forward rather than die (``PET_SIGNALS_TO_HANDLE``) and to
   give the ranks the whole lead time before SIGKILL (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``);
3. on exit, requeue the job when it was signalled or the trainer asked for it. The requeued job runs
   the same script again, and the trainer's ``--resume auto`` picks up the checkpoint it just wrote.

The trainer asks by exiting 75 *and* writing a marker file (``DELTA_MEGATRON_REQUEUE_MARKER``, in the
job directory): torchrun turns any worker failure into exit code 1, so the code alone never reaches
this shell. The trainer also stops by itself before the job's end time (no signal at all), which is
why these lines are installed whether or not the profile asks Slurm for a signal. A step that stopped
for a requeue counts as a success (``srun`` returns 0), so it never uses up NeMo-Run's crash retries.
"""

from __future__ import annotations

import re

from delta_megatron.utils.preemption import REQUEUE_EXIT_CODE, REQUEUE_MARKER_ENV

__all__ = ["parse_signal", "torchrun_env", "batch_setup_lines", "REQUEUE_MARKER_ENV"]

_SIGNAL = re.compile(r"^(B:)?(USR1|USR2|TERM|INT|SIGUSR1|SIGUSR2|SIGTERM)@(\d+)$")


def parse_signal(spec: str) -> tuple[bool, str, int]:
    """``B:USR1@120`` -> (batch shell only, "USR1", 120 s of lead time)."""
    match = _SIGNAL.match(spec)
    if not match:
        raise ValueError(f"signal {spec!r}: expected [B:]USR1@<seconds>")
    return bool(match.group(1)), match.group(2).removeprefix("SIG"), int(match.group(3))


def torchrun_env(lead_s: int) -> dict[str, str]:
    """torchrun (>= 2.8) handles and forwards these signals to its workers instead of dying on
    SIGUSR1's default action, and waits ``lead_s`` for them to exit before SIGKILL."""
    return {"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(lead_s)}


def batch_setup_lines(signal_name: str | None = "USR1", exit_code: int = REQUEUE_EXIT_CODE,
                      marker: str | None = None) -> str:
    """Bash for the batch script (see the module docstring for why each part exists); ``marker`` is
    the requeue-marker path as this shell sees it (``None``: only exit code 75 asks)."""
    trap = f"""\
dm_on_signal() {{
  dm_preempted=1
  echo "delta-megatron: SIG{signal_name} at $(date '+%F %T'): job steps checkpoint and exit"
  scancel --quiet --signal={signal_name} "$SLURM_JOB_ID"
}}
trap dm_on_signal {signal_name}
""" if signal_name else ""
    return f"""\
# --- delta-megatron preemption (launchers/requeue.py) ---
dm_preempted=0
dm_marker="{marker or ''}"  # the trainer saved and asks for a requeue (torchrun hides its exit code)
dm_asked() {{ [ -n "$dm_marker" ] && [ -f "$dm_marker" ]; }}
{trap}dm_on_exit() {{
  if dm_asked; then dm_preempted=1; rm -f "$dm_marker"; fi
  if [ "$dm_preempted" = 1 ]; then
    echo "delta-megatron: requeueing job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}})"
    scontrol requeue "$SLURM_JOB_ID"
  fi
}}
trap dm_on_exit EXIT
srun() {{  # background + wait, so the trap is not deferred until the step ends
  command srun "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do wait "$pid" || :; done
  wait "$pid"
  local rc=$?
  if [ "$rc" = {exit_code} ] || dm_asked; then  # a clean stop for a requeue, not a crash
    dm_preempted=1; [ "$BASH_SUBSHELL" -gt 0 ] && dm_on_exit
    return 0
  fi
  return "$rc"
}}
# --- end delta-megatron preemption ---"""
