"""A small JSON-over-HTTP client with timeouts, retries with backoff, and cancellation.

Built on ``http.client`` (stdlib) rather than requests/httpx: it is the same on the CPU machine and on
a cluster with SGLang (no version skew with SGLang's own pins), and it exposes the socket of every
in-flight request, which is what cancelling a request stuck on a hung server needs.

Every call has a total deadline: ``timeout × (retries + 1)`` plus the backoff sleeps between attempts
(:meth:`HttpClient.deadline_s`), unless the caller passes its own. An attempt gets at most the time
left, and a watchdog closes the socket of an attempt that outlives ``timeout`` (wall clock, not per
socket read), so a server that trickles bytes or a frozen (SIGSTOPped) one — whose kernel still
accepts connections — is reported once the deadline passes.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from delta_megatron.rollout.engine import RequestFailed

__all__ = ["HttpClient", "HttpStatusError", "RequestCancelled", "RequestDeadlineExceeded"]

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class HttpStatusError(RequestFailed):
    """The server answered with an error status (kept to tell 4xx from 5xx)."""

    def __init__(self, message: str, status: int, body: str):
        super().__init__(message)
        self.status, self.body = status, body


class RequestCancelled(RequestFailed):
    """The request was cancelled by :meth:`HttpClient.cancel` (e.g. an abort); never retried."""


class RequestDeadlineExceeded(TimeoutError):
    """An attempt outlived its time (its socket closed by the watchdog)."""


class _Watchdog:
    """One daemon thread per client that shuts down the socket of every attempt past its deadline."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._due: dict[int, tuple[float, http.client.HTTPConnection]] = {}
        self._expired: set[int] = set()
        self._thread: threading.Thread | None = None
        self._closed = False

    def watch(self, conn: http.client.HTTPConnection, deadline: float) -> None:
        with self._cv:
            self._due[id(conn)] = (deadline, conn)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dm-http-deadline", daemon=True)
                self._thread.start()
            self._cv.notify()

    def unwatch(self, conn: http.client.HTTPConnection) -> bool:
        """Stop watching; True when the deadline had cut the attempt off."""
        with self._cv:
            self._due.pop(id(conn), None)
            if id(conn) in self._expired:
                self._expired.discard(id(conn))
                return True
            return False

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()

    def _run(self) -> None:
        with self._cv:
            while not self._closed:
                now = time.monotonic()
                for key, (deadline, conn) in list(self._due.items()):
                    if deadline <= now:
                        del self._due[key]
                        self._expired.add(key)
                        _shutdown(conn)
                wake = min((d for d, _ in self._due.values()), default=None)
                self._cv.wait(None if wake is None else max(0.0, wake - now))


def _shutdown(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class HttpClient:
    """POST/GET JSON with ``max_retries`` retries on connection errors, timeouts and 408/429/5xx,
    all within a total deadline (see the module docstring).

    4xx answers are not retried (the request is wrong, retrying cannot help). Backoff doubles from
    ``backoff_s`` up to ``backoff_max_s`` with ±20 % jitter from a private RNG.
    """

    def __init__(self, timeout_s: float = 600.0, max_retries: int = 3, backoff_s: float = 0.5,
                 backoff_max_s: float = 10.0, seed: int = 0):
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.backoff_s, self.backoff_max_s = backoff_s, backoff_max_s
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._live: dict[str, list[http.client.HTTPConnection]] = {}
        self._cancelled: set[str] = set()
        self._closing = threading.Event()
        self._watchdog = _Watchdog()

    def backoff_total_s(self, retries: int) -> float:
        """Longest total sleep between ``retries + 1`` attempts (jitter included)."""
        return 1.2 * sum(min(self.backoff_max_s, self.backoff_s * 2 ** k) for k in range(retries))

    def deadline_s(self, timeout: float | None = None, retries: int | None = None) -> float:
        """The total time a call may take: every attempt's timeout plus the sleeps between them."""
        timeout = self.timeout_s if timeout is None else timeout
        retries = self.max_retries if retries is None else retries
        return timeout * (retries + 1) + self.backoff_total_s(retries)

    def get(self, url: str, **kw) -> Any:
        return self.request("GET", url, None, **kw)

    def post(self, url: str, payload: dict[str, Any] | None = None, **kw) -> Any:
        return self.request("POST", url, payload if payload is not None else {}, **kw)

    def request(self, method: str, url: str, payload: dict[str, Any] | None, *,
                timeout: float | None = None, retries: int | None = None,
                deadline_s: float | None = None, cancel_key: str | None = None,
                before_retry: Callable[[int, Exception], None] | None = None) -> Any:
        """Send, retrying transient failures; returns parsed JSON (or text for non-JSON bodies).

        ``timeout`` bounds each attempt, ``deadline_s`` the whole call (default :meth:`deadline_s`).
        ``before_retry(attempt, error)`` runs before each retry and may edit ``payload`` in place
        (e.g. give a re-sent generation a fresh request id); it should not block (the deadline runs).
        """
        retries = self.max_retries if retries is None else retries
        timeout = self.timeout_s if timeout is None else timeout
        budget = self.deadline_s(timeout, retries) if deadline_s is None else deadline_s
        start = time.monotonic()
        deadline = start + budget
        last: Exception | None = None
        attempts = 0
        for attempt in range(retries + 1):
            if attempt:
                if before_retry is not None:
                    before_retry(attempt, last)
                delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
                with self._lock:
                    delay *= 1 + 0.2 * (2 * self._rng.random() - 1)
                if self._closing.wait(min(delay, max(0.0, deadline - time.monotonic()))):
                    break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if cancel_key is not None and self._is_cancelled(cancel_key):
                raise RequestCancelled(f"{method} {url}: cancelled")
            attempts += 1
            try:
                return self._once(method, url, payload, min(timeout, left), cancel_key, deadline)
            except HttpStatusError as err:
                if err.status not in _RETRY_STATUS:
                    raise
                last = err
            except (OSError, http.client.HTTPException) as err:  # refused, reset, timeout, ...
                if cancel_key is not None and self._is_cancelled(cancel_key):
                    raise RequestCancelled(f"{method} {url}: cancelled") from err
                last = err
        kind = "timed out" if isinstance(last, (socket.timeout, TimeoutError)) else "failed"
        raise RequestFailed(f"{method} {url} {kind} after {attempts} attempt(s) in "
                            f"{time.monotonic() - start:.1f} s (timeout {timeout:g} s per attempt, "
                            f"{budget:g} s in all): {last!r}") from last

    def _once(self, method: str, url: str, payload: dict[str, Any] | None, timeout: float,
              cancel_key: str | None, deadline: float) -> Any:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        key = cancel_key or f"#{id(conn)}"
        with self._lock:
            self._live.setdefault(key, []).append(conn)
        self._watchdog.watch(conn, min(deadline, time.monotonic() + timeout))
        try:
            body = None if payload is None else json.dumps(payload).encode()
            headers = {"Content-Type": "application/json"} if body is not None else {}
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            conn.request(method, path or "/", body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            ctype = resp.getheader("Content-Type", "")
        except (OSError, http.client.HTTPException) as err:
            if self._watchdog.unwatch(conn):
                raise RequestDeadlineExceeded(f"attempt cut off after {timeout:g} s ({err!r})") from err
            raise
        finally:
            self._watchdog.unwatch(conn)
            with self._lock:
                conns = self._live.get(key, [])
                if conn in conns:
                    conns.remove(conn)
                if not conns:
                    self._live.pop(key, None)
            conn.close()
        text = data.decode("utf-8", errors="replace")
        if resp.status >= 400:
            raise HttpStatusError(f"{method} {url} -> HTTP {resp.status}: {text[:500]}",
                                  resp.status, text)
        if "json" in ctype or text[:1] in "[{":
            try:
                return json.loads(text) if text else None
            except json.JSONDecodeError:
                return text
        return text

    def _is_cancelled(self, key: str) -> bool:
        with self._lock:
            return key in self._cancelled

    def cancel(self, keys: list[str]) -> None:
        """Cancel requests by key: close their sockets now and refuse further attempts."""
        with self._lock:
            self._cancelled.update(keys)
            conns = [c for k in keys for c in self._live.get(k, [])]
        for conn in conns:
            _shutdown(conn)

    def forget(self, keys: list[str]) -> None:
        """Drop cancellation marks of finished requests (keeps the set bounded)."""
        with self._lock:
            self._cancelled.difference_update(keys)

    def close(self) -> None:
        """Stop waiting in backoffs (pending retries give up)."""
        self._closing.set()
        self._watchdog.close()
