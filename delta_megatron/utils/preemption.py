"""Preemption: turn SIGUSR1/SIGTERM into a flag the trainer checks, so it saves and exits cleanly.

Why a flag and not work in the handler: a signal can land in the middle of a collective or an
optimizer step; saving from inside the handler would deadlock or write a torn checkpoint. The handler
only records the signal; the training loop asks :meth:`Preemption.should_stop` at safe points (step
boundaries, and before the first optimizer step of a rollout batch), saves, and exits with
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
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
import torch.distributed as dist

#: sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry" — the trainer saved a
#: checkpoint because it was asked to stop, and the job should be requeued.
REQUEUE_EXIT_CODE = 75

DEFAULT_SIGNALS = ("SIGUSR1", "SIGTERM")

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
            self.received = reason
        self._event.set()

    @property
    def requested(self) -> bool:
        """This rank's flag, without communication."""
        return self._event.is_set()

    def should_stop(self, group: Any = None) -> bool:
        """True on every rank if *any* rank of ``group`` was signalled. Collective when
        torch.distributed is initialised: all ranks of ``group`` must call it at the same point."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
            else torch.device("cpu")
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        stop = bool(flag.item())
        if stop and not self.requested:
            self.request("peer")
        return stop


def restart_count() -> int:
    """How many times the scheduler has restarted this job (Slurm sets SLURM_RESTART_COUNT on a
    requeued job); 0 outside a scheduler. For logs and metrics only — resuming is decided by the
    checkpoint directory (``--resume auto``), never by this number."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
