"""Preemption: turn SIGUSR1/SIGTERM into a flag the trainer checks, so it saves and exits cleanly.

Why a flag and not work in the handler: a signal can land in the middle of a collective or an
optimizer step; saving from inside the handler would deadlock or write a torn checkpoint. The handler
only records the signal; the training loop asks :meth:`Preemption.should_stop` at safe points (the
stage boundaries: after the rollout, after each optimizer step, after the weight sync, after the
step), saves, and exits with
:data:`REQUEUE_EXIT_CODE`. The batch script that launched it (see ``launchers/requeue.py``) requeues
the job, and the next run resumes with ``--resume auto``.

Only some ranks may receive the signal (e.g. one node's ranks first), so ``should_stop`` reduces the
flag with MAX over the process group: every rank stops at the same step. The module knows nothing of
Slurm: any launcher that signals the ranks and treats exit code 75 as "requeue me" works.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

#: sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry" — the trainer saved a
#: checkpoint because it was asked to stop, and the job should be requeued.
REQUEUE_EXIT_CODE = 75

DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")

#: where a stopped run leaves its "requeue me" note (set by the launcher): torchrun reports any failed
#: worker as exit code 1, so exit code 75 alone does not reach the batch script
REQUEUE_MARKER_ENV = "DELTA_MEGATRON_REQUEUE_MARKER"

_Handler = Callable[[int, FrameType | None], Any] | int | None


class Preemption:
    """Installs handlers for ``signals``; ``requested`` turns true once one of them arrived.

    Use as a context manager (restores the previous handlers on exit)::

        with Preemption() as preempt:
            for step in range(start, steps):
                ...
                if preempt.should_stop(group):
                    save(step); sys.exit(REQUEUE_EXIT_CODE)
    """

    def __init__(self, signals: tuple[str, ...] = DEFAULT_SIGNALS):
        self.signal_names = tuple(signals)
        self.received: str | None = None  # name of the first signal that arrived
        self.received_at: float | None = None  # when (epoch seconds)
        self._event = threading.Event()
        self._previous: dict[int, _Handler] = {}

    # ------------------------------------------------------------------ install / restore
    def install(self) -> Preemption:
        """Register the handlers. Signal handlers can only be set from the main thread; elsewhere
        (e.g. a test runner thread) this is a no-op and only :meth:`request` can set the flag."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in self.signal_names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> Preemption:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    # ------------------------------------------------------------------ flag
    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, reason: str = "requested") -> None:
        """Set the flag (what the handler does; also usable from code, e.g. a wall-clock budget)."""
        if self.received is None:
            self.received, self.received_at = reason, time.time()
        self._event.set()

    @property
    def requested(self) -> bool:
        """This rank's flag, without communication."""
        return self._event.is_set()

    def should_stop(self, group: Any = None) -> bool:
        """True on every rank if *any* rank of ``group`` was signalled. Collective when
        torch.distributed is initialised: all ranks of ``group`` must call it at the same point."""
        return self.decide(group=group)[0]

    def decide(self, *flags: bool, group: Any = None) -> tuple[bool, ...]:
        """``(stop, *flags)`` as every rank of ``group`` sees them: each is true if it is true on any
        rank (one all-reduce), ``stop`` being this flag. Lets rank 0 alone decide something (a
        deadline, a wall-clock save) and every rank act on it at the same point. Collective."""
        local = [int(self.requested), *(int(bool(f)) for f in flags)]
        if dist.is_available() and dist.is_initialized():
            backend = dist.get_backend(group)
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
                else torch.device("cpu")
            both = torch.tensor(local, dtype=torch.int32, device=device)
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
            local = both.tolist()
        if local[0] and not self.requested:
            self.request("peer")
        return tuple(bool(x) for x in local)


def mark_requeue() -> None:
    """Ask the batch script for a requeue: write the marker file the launcher named (if any)."""
    path = os.environ.get(REQUEUE_MARKER_ENV)
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(os.environ.get("SLURM_JOB_ID", "") + "\n")


def restart_count() -> int:
    """How many times the scheduler has restarted this job (Slurm sets SLURM_RESTART_COUNT on a
    requeued job); 0 outside a scheduler. For logs and metrics only — resuming is decided by the
    checkpoint directory (``--resume auto``), never by this number."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
