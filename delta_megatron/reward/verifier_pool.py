"""A pool of killable verifier processes with a hard per-sample timeout.

Why processes and not threads: math-verify (sympy) can spend minutes inside one C call on a
pathological answer (``9^{9^{9^{9}}}``), and its own ``signal.alarm`` timeout only works in a main
thread and cannot interrupt C code. Each worker therefore runs the score function in its own main
thread, and the parent enforces the deadline from outside: on expiry the worker is SIGKILLed and
replaced, the sample scores 0 and ``timeouts`` counts it. A worker that dies (``os._exit``, segfault,
OOM kill) scores its sample 0 under ``crashes``; an exception in the score function scores 0 under
``errors``. Nothing a response contains can hang a training step.

Start-up is cheap: workers are forked from a ``forkserver`` that has already imported math-verify, so
the first pool pays the sympy import once and a replacement after a timeout costs a fork plus the
score module's ``warmup()`` (run before the worker reports ready, so no sample's deadline pays for
cold caches). The score function is named by ``"module:function"`` so the trainer process itself never
imports sympy. At a deadline the verdict is recorded and the worker SIGKILLed at once, every expired
worker in the same pass; reaping it and starting its replacement happen later (before the next
dispatch that needs the slot), so under load a verdict is not late by the cost of process
management (``bench/verifier_deadline.py`` measures the overshoot). Workers are reused across :meth:`VerifierPool.score` calls and shut down by
:meth:`close`, the context manager, or at interpreter exit (``weakref.finalize``).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import multiprocessing as mp
import os
import signal
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait as mp_wait

__all__ = ["VerifierPool", "VerifyStats", "ScoreFn", "DEFAULT_SCORE_FN"]

ScoreFn = Callable[[str, str], "float | None"]
"""``score_fn(response, gold) -> reward`` (None: no answer found). Pass a module-level function, or its
``"module:function"`` name so the parent need not import the module."""

DEFAULT_SCORE_FN = "delta_megatron.reward.verify:math_verify_score"

_READY = "ready"
log = logging.getLogger(__name__)
_MAX_START_FAILURES = 3


@dataclass
class VerifyStats:
    """Counters of one scoring call (or, summed, of a pool's lifetime). ``correct`` counts reward > 0."""

    total: int = 0
    correct: int = 0
    no_answer: int = 0
    timeouts: int = 0
    crashes: int = 0
    errors: int = 0
    seconds: float = 0.0

    def __add__(self, other: VerifyStats) -> VerifyStats:
        return VerifyStats(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                              for f in dataclasses.fields(self)})

    def as_metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Flat metrics for the logger: counts plus the rates a training curve wants."""
        out = {f"{prefix}{f.name}": float(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if self.total:
            out[f"{prefix}accuracy"] = self.correct / self.total
            out[f"{prefix}no_answer_rate"] = self.no_answer / self.total
        return out


def _resolve(score_fn: ScoreFn | str) -> ScoreFn:
    if callable(score_fn):
        return score_fn
    module, _, name = score_fn.partition(":")
    return getattr(importlib.import_module(module), name)


def _module_name(score_fn: ScoreFn | str) -> str:
    return score_fn.partition(":")[0] if isinstance(score_fn, str) else score_fn.__module__


def _worker_main(conn, score_fn: ScoreFn | str, max_memory_mb: int | None) -> None:
    """Worker loop: warm up, announce readiness, then score ``(idx, response, gold)`` requests until
    told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's business, not ours
    score_fn = _resolve(score_fn)
    warmup = getattr(importlib.import_module(score_fn.__module__), "warmup", None)
    if callable(warmup):
        try:
            warmup()
        except Exception:  # not fatal: a real failure shows up as errors on real samples
            pass
    if max_memory_mb:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = max_memory_mb * 2**20
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))  # a runaway parse gets MemoryError
    conn.send(_READY)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent went away
            return
        if msg is None:
            return
        idx, response, gold = msg
        try:
            reward = score_fn(response, gold)
            if reward is None:
                out = (idx, 0.0, "no_answer")
            elif isinstance(reward, (int, float)) and math.isfinite(reward):
                out = (idx, float(reward), "ok")
            else:
                out = (idx, 0.0, f"error: score_fn returned {reward!r}")
        except Exception as err:  # a verifier bug or a data error must not stop the step
            out = (idx, 0.0, f"error: {type(err).__name__}: {str(err)[:200]}")
        conn.send(out)


class _Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, ctx, score_fn: ScoreFn | str, max_memory_mb: int | None):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, score_fn, max_memory_mb),
                                daemon=True, name="verifier")
        self.proc.start()
        child.close()
        self.started = time.monotonic()
        self.ready = False
        self.task: int | None = None
        self.deadline = math.inf
        self.retired = False  # killed; its slot gets a new worker when needed

    def kill(self, join_s: float = 5.0) -> None:
        if self.proc.exitcode is None:
            self.proc.kill()
        if join_s:
            self.proc.join(timeout=join_s)
        self.conn.close()
        self.retired, self.ready, self.task = True, False, None


def _shutdown(workers: list[_Worker], owner_pid: int, dying: list[_Worker] | None = None,
              grace_s: float = 1.0) -> None:
    """Ask idle workers to exit, give them ``grace_s`` together, SIGKILL the rest (busy ones at once);
    reap the ones killed earlier."""
    if os.getpid() != owner_pid:  # a forked child inherited the pool object: the workers are not its own
        return
    for w in dying or ():
        try:
            w.proc.join(timeout=grace_s)
        except Exception:  # interpreter shutdown: best effort
            pass
    for w in workers:
        if w.task is None and not w.retired:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
    deadline = time.monotonic() + grace_s
    for w in workers:
        try:
            if w.task is None:
                w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            w.kill()
        except Exception:  # interpreter shutdown: best effort
            pass
    workers.clear()


class VerifierPool:
    """Score ``(response, gold)`` pairs in ``num_workers`` killable processes, ``timeout_s`` each.

    ``score`` returns rewards in input order (``score_fn``'s value; 0.0 for no answer, timeout, crash or
    error) and a :class:`VerifyStats`; ``totals`` accumulates over the pool's lifetime.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0,
                 score_fn: ScoreFn | str = DEFAULT_SCORE_FN, *, max_memory_mb: int | None = None,
                 start_timeout_s: float = 120.0, start_method: str = "forkserver"):
        if num_workers < 1:
            raise ValueError(f"num_workers: {num_workers!r} — must be >= 1")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s: {timeout_s!r} — must be > 0")
        if isinstance(score_fn, str) and ":" not in score_fn:
            raise ValueError(f"score_fn: {score_fn!r} — name it as 'module:function'")
        self.num_workers, self.timeout_s, self.score_fn = num_workers, float(timeout_s), score_fn
        self.max_memory_mb, self.start_timeout_s = max_memory_mb, start_timeout_s
        self._ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            # Only takes effect if this process has not started its forkserver yet.
            module = _module_name(score_fn)
            self._ctx.set_forkserver_preload(
                ["delta_megatron.reward._warm"] + ([module] if module != "__main__" else []))
        self.totals = VerifyStats()
        self._workers: list[_Worker] = []
        self._dying: list[_Worker] = []  # SIGKILLed, not yet reaped
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, os.getpid(), self._dying)
        for _ in range(num_workers):
            self._workers.append(self._spawn())

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.score_fn, self.max_memory_mb)

    def _replace(self, i: int) -> None:
        if self.closed:  # close() (or interpreter exit) ran from another thread mid-score
            raise RuntimeError("VerifierPool was closed while scoring")
        if not self._workers[i].retired:
            self._retire(self._workers[i])
        self._workers[i] = self._spawn()

    def _retire(self, w: _Worker) -> None:
        """SIGKILL now, reap later (waiting for the exit status costs ~0.1-0.3 s under load)."""
        w.kill(join_s=0)
        self._dying.append(w)

    def _reap(self) -> None:
        for w in list(self._dying):
            w.proc.join(timeout=0)
            if w.proc.exitcode is not None:
                self._dying.remove(w)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Stop all workers (idempotent)."""
        self._finalizer()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def score(self, items: Sequence[tuple[str, str]]) -> tuple[list[float], VerifyStats]:
        """Rewards for ``[(response_text, gold), ...]`` in input order, and this call's counters."""
        if self.closed:
            raise RuntimeError("VerifierPool.score called after close()")
        for i, item in enumerate(items):
            if not (isinstance(item, (tuple, list)) and len(item) == 2
                    and isinstance(item[0], str) and isinstance(item[1], str)):
                raise TypeError(f"items[{i}]: {item!r:.120} — expected a (response_text, gold) pair of str")
        self._reap()
        for i, w in enumerate(self._workers):
            if w.task is not None or w.retired:  # busy for an earlier call that raised (Ctrl-C), or killed
                self._replace(i)
        t0 = time.monotonic()
        stats = VerifyStats(total=len(items))
        rewards: list[float] = [0.0] * len(items)
        pending = deque(range(len(items)))
        start_failures = 0
        first_error: list[str] = []

        def record(idx: int, reward: float, status: str) -> None:
            rewards[idx] = reward
            if status not in ("ok", "no_answer") and not first_error:
                first_error.append(f"items[{idx}]: {status}")
            if status == "ok":
                stats.correct += reward > 0
            elif status == "no_answer":
                stats.no_answer += 1
            elif status == "timeout":
                stats.timeouts += 1
            elif status == "crash":
                stats.crashes += 1
            else:
                stats.errors += 1

        while pending or any(w.task is not None for w in self._workers):
            if pending:  # slots of workers killed in the last pass get new ones now that work waits
                for i, w in enumerate(self._workers):
                    if w.retired:
                        self._replace(i)
            now = time.monotonic()
            for i, w in enumerate(self._workers):  # dispatch to idle, ready workers
                if w.ready and w.task is None and pending:
                    idx = pending.popleft()
                    try:
                        w.conn.send((idx, *items[idx]))
                    except (OSError, ValueError):  # died while idle: not this sample's fault
                        pending.appendleft(idx)
                        self._replace(i)
                        continue
                    w.task, w.deadline = idx, now + self.timeout_s
            waiting = [w for w in self._workers if not w.retired and (w.task is not None or not w.ready)]
            deadlines = [w.deadline for w in waiting if w.task is not None]
            deadlines += [w.started + self.start_timeout_s for w in waiting if not w.ready]
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            mp_wait([w.conn for w in waiting] + [w.proc.sentinel for w in waiting], wait_s)
            if self.closed:
                raise RuntimeError("VerifierPool was closed while scoring")
            now = time.monotonic()
            for w in list(self._workers):
                if w.retired:
                    continue
                dead = False
                try:
                    while w.conn.poll():
                        msg = w.conn.recv()
                        if msg == _READY:
                            w.ready = True
                        else:
                            idx, reward, status = msg
                            if idx == w.task:
                                record(idx, reward, status)
                                w.task, w.deadline = None, math.inf
                except (EOFError, OSError):
                    dead = True
                dead = dead or not w.proc.is_alive()
                if dead:
                    if w.task is not None:
                        record(w.task, 0.0, "crash")
                    elif not w.ready:
                        start_failures += 1
                        if start_failures > _MAX_START_FAILURES * self.num_workers:
                            raise RuntimeError(
                                f"verifier workers keep dying at start-up (exit code "
                                f"{w.proc.exitcode}); check that {_module_name(self.score_fn)} imports "
                                "in a fresh process")
                    self._retire(w)
                elif w.task is not None and now >= w.deadline:
                    record(w.task, 0.0, "timeout")
                    self._retire(w)
                elif not w.ready and now >= w.started + self.start_timeout_s:
                    raise RuntimeError(f"a verifier worker did not start within {self.start_timeout_s} s")
        stats.seconds = time.monotonic() - t0
        self.totals = self.totals + stats
        if first_error:
            log.warning("verifier: %d timeouts, %d crashes, %d errors in %d samples (scored 0); first: %s",
                        stats.timeouts, stats.crashes, stats.errors, stats.total, first_error[0])
        return rewards, stats

    def __repr__(self) -> str:
        name = self.score_fn if isinstance(self.score_fn, str) else \
            f"{self.score_fn.__module__}:{self.score_fn.__qualname__}"
        return f"VerifierPool(num_workers={self.num_workers}, timeout_s={self.timeout_s}, score_fn={name})"
