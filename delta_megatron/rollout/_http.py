"""A small JSON-over-HTTP client with timeouts, retries with backoff, and cancellation.

Built on ``http.client`` (stdlib) rather than requests/httpx: it is the same on the CPU machine and on
a cluster with SGLang (no version skew with SGLang's own pins), and it exposes the socket of every
in-flight request, which is what cancelling a request stuck on a hung server needs.

``timeout`` is per socket operation: for SGLang's non-streaming ``/generate`` (silent until done) it
bounds the wait for the whole response.
"""

from __future__ import annotations

import http.client
import json
import random
import socket
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from delta_megatron.rollout.engine import RequestFailed

__all__ = ["HttpClient", "HttpStatusError", "RequestCancelled"]

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class HttpStatusError(RequestFailed):
    """The server answered with an error status (kept to tell 4xx from 5xx)."""

    def __init__(self, message: str, status: int, body: str):
        super().__init__(message)
        self.status, self.body = status, body


class RequestCancelled(RequestFailed):
    """The request was cancelled by :meth:`HttpClient.cancel` (e.g. an abort); never retried."""


class HttpClient:
    """POST/GET JSON with ``max_retries`` retries on connection errors, timeouts and 408/429/5xx.

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

    def get(self, url: str, **kw) -> Any:
        return self.request("GET", url, None, **kw)

    def post(self, url: str, payload: dict[str, Any] | None = None, **kw) -> Any:
        return self.request("POST", url, payload if payload is not None else {}, **kw)

    def request(self, method: str, url: str, payload: dict[str, Any] | None, *,
                timeout: float | None = None, retries: int | None = None,
                cancel_key: str | None = None,
                before_retry: Callable[[int, Exception], None] | None = None) -> Any:
        """Send, retrying transient failures; returns parsed JSON (or text for non-JSON bodies).

        ``before_retry(attempt, error)`` runs before each retry and may edit ``payload`` in place
        (e.g. give a re-sent generation a fresh request id after aborting the old one).
        """
        retries = self.max_retries if retries is None else retries
        timeout = self.timeout_s if timeout is None else timeout
        last: Exception | None = None
        for attempt in range(retries + 1):
            if attempt:
                if before_retry is not None:
                    before_retry(attempt, last)
                delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
                with self._lock:
                    delay *= 1 + 0.2 * (2 * self._rng.random() - 1)
                if self._closing.wait(delay):
                    break
            if cancel_key is not None and self._is_cancelled(cancel_key):
                raise RequestCancelled(f"{method} {url}: cancelled")
            try:
                return self._once(method, url, payload, timeout, cancel_key)
            except HttpStatusError as err:
                if err.status not in _RETRY_STATUS:
                    raise
                last = err
            except (OSError, http.client.HTTPException) as err:  # refused, reset, timeout, ...
                if cancel_key is not None and self._is_cancelled(cancel_key):
                    raise RequestCancelled(f"{method} {url}: cancelled") from err
                last = err
        kind = "timed out" if isinstance(last, (socket.timeout, TimeoutError)) else "failed"
        raise RequestFailed(f"{method} {url} {kind} after {retries + 1} attempt(s) "
                            f"(timeout {timeout:g} s): {last!r}") from last

    def _once(self, method: str, url: str, payload: dict[str, Any] | None, timeout: float,
              cancel_key: str | None) -> Any:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        key = cancel_key or f"#{id(conn)}"
        with self._lock:
            self._live.setdefault(key, []).append(conn)
        try:
            body = None if payload is None else json.dumps(payload).encode()
            headers = {"Content-Type": "application/json"} if body is not None else {}
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            conn.request(method, path or "/", body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            ctype = resp.getheader("Content-Type", "")
        finally:
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
            sock = conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def forget(self, keys: list[str]) -> None:
        """Drop cancellation marks of finished requests (keeps the set bounded)."""
        with self._lock:
            self._cancelled.difference_update(keys)

    def close(self) -> None:
        """Stop waiting in backoffs (pending retries give up)."""
        self._closing.set()
