"""Launching SGLang servers and ``sglang_router`` as child processes, and waiting until they serve.

``launch_servers`` starts one ``python -m sglang.launch_server`` per
:class:`~delta_megatron.topology.ServerSlot` (its GPUs via ``--base-gpu-id``, bound to its node's
address) and waits for each ``/health``; ``launch_router`` starts ``python -m
sglang_router.launch_router --worker-urls ...`` and waits until the router lists every worker as
healthy. ``launch_server_group`` does both for one node (the servers of ``servers_per_node``). Each child runs in its own session with its log in ``log_dir``; a child that exits
during start-up fails the launch at once with the tail of its log, and everything already started is
stopped. On a cluster where servers are started by Slurm instead, skip this module and give their
URLs to :class:`~delta_megatron.rollout.sglang_engine.SGLangEngine` directly.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from delta_megatron.rollout.engine import RolloutError

__all__ = ["ManagedProcess", "ServerGroup", "server_command", "router_command", "start_process",
           "wait_healthy", "launch_servers", "launch_router", "launch_server_group"]


def server_command(model_path: str, port: int, cfg, *, host: str = "127.0.0.1",
                   base_gpu_id: int = 0, python: str = sys.executable) -> list[str]:
    """``python -m <cfg.server_module>`` (``sglang.launch_server``) for one server of ``cfg`` (an
    SGLangConfig); DP attention adds ``--dp-size N --enable-dp-attention``."""
    dp = ["--dp-size", str(cfg.dp_attention), "--enable-dp-attention"] if cfg.dp_attention > 1 else []
    return [python, "-m", cfg.server_module, "--model-path", str(model_path),
            "--host", host, "--port", str(port), "--tp-size", str(cfg.tp), *dp,
            "--mem-fraction-static", str(cfg.mem_fraction), "--base-gpu-id", str(base_gpu_id),
            *(["--enable-memory-saver"] if cfg.memory_saver else []), *cfg.extra_args]


def router_command(worker_urls: Sequence[str], port: int, *, host: str = "127.0.0.1",
                   policy: str = "cache_aware", python: str = sys.executable,
                   extra_args: Sequence[str] = ()) -> list[str]:
    """``python -m sglang_router.launch_router --worker-urls ...`` (sglang-router >= 0.2). Its
    Prometheus exporter goes to ``port + 1`` on the same host: by default it takes 29000 on every
    interface, the router's own default port."""
    return [python, "-m", "sglang_router.launch_router", "--worker-urls", *worker_urls,
            "--host", host, "--port", str(port), "--policy", policy,
            "--prometheus-host", host, "--prometheus-port", str(port + 1), *extra_args]


@dataclass
class ManagedProcess:
    """A child process in its own session (so stopping it stops its workers) with a log file."""

    name: str
    cmd: list[str]
    proc: subprocess.Popen
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the child's process group, SIGKILL it after ``timeout_s``."""
        if not self.alive():
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)  # the group of *our* child (start_new_session)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=timeout_s)
                return
            except subprocess.TimeoutExpired:
                continue


def start_process(name: str, cmd: list[str], log_dir: str | Path,
                  env: dict[str, str] | None = None) -> ManagedProcess:
    log_path = Path(log_dir) / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    return ManagedProcess(name, cmd, proc, log_path)


def _get(url: str, timeout: float) -> tuple[int, str]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("GET", parts.path or "/")
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", errors="replace")
    finally:
        conn.close()


def _healthy_workers(body: str) -> int:
    data = json.loads(body)
    if "workers" in data:  # sglang-router >= 0.2: {"workers": [{"url", "is_healthy", ...}], ...}
        return sum(bool(w.get("is_healthy", True)) for w in data["workers"])
    return len(data.get("urls", []))  # older /list_workers


def wait_healthy(url: str, *, timeout_s: float, process: ManagedProcess | None = None,
                 path: str = "/health", poll_s: float = 1.0, expect_workers: int | None = None,
                 stop: threading.Event | None = None, probe_timeout_s: float = 10.0) -> None:
    """Poll ``url + path`` until HTTP 200 (and, for a router, ``expect_workers`` healthy workers).

    Fails early with the log tail when ``process`` exits; fails with the last error at the deadline,
    which bounds the whole wait: each probe gets at most ``probe_timeout_s`` and never more than the
    time left (a frozen server cannot stretch it).
    """
    deadline = time.monotonic() + timeout_s
    stop = stop or threading.Event()
    last = "no answer yet"

    def probe(target: str) -> tuple[int, str]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline reached")
        return _get(target, timeout=min(probe_timeout_s, left))

    while time.monotonic() < deadline:
        if process is not None and not process.alive():
            raise RolloutError(f"{process.name} exited with code {process.proc.returncode} before "
                               f"{url} was healthy; last log lines:\n{process.tail()}")
        try:
            status, body = probe(url + path)
            if status == 200 and expect_workers is None:
                return
            if status == 200:
                status, body = probe(url + "/workers")
                if status == 404:
                    status, body = probe(url + "/list_workers")
                count = _healthy_workers(body) if status == 200 else 0
                if count >= expect_workers:
                    return
                last = f"{count} of {expect_workers} workers healthy"
            else:
                last = f"HTTP {status}"
        except (OSError, http.client.HTTPException, ValueError) as err:
            last = repr(err)
        if stop.wait(min(poll_s, max(0.0, deadline - time.monotonic()))):
            break
    tail = f"; last log lines:\n{process.tail()}" if process is not None else ""
    raise RolloutError(f"{url}{path} not healthy after {timeout_s:g} s ({last}){tail}")


@dataclass
class ServerGroup:
    """Servers (+ router) this process started; ``close`` stops them (router first)."""

    servers: list[ManagedProcess] = field(default_factory=list)
    router: ManagedProcess | None = None
    worker_urls: list[str] = field(default_factory=list)
    router_url: str | None = None

    def close(self) -> None:
        for proc in ([self.router] if self.router else []) + self.servers[::-1]:
            proc.stop()

    def __enter__(self) -> ServerGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def launch_servers(model_path: str, cfg, slots, *, log_dir: str | Path,
                   startup_timeout_s: float = 900.0, env: dict[str, str] | None = None,
                   server_cmd: Callable[[int, int], list[str]] | None = None) -> ServerGroup:
    """Start one server per slot (``ServerSlot``: host, port, GPUs) in parallel and wait until each
    serves; on any failure everything started is stopped."""
    group = ServerGroup()
    try:
        for slot in slots:
            cmd = (server_cmd(slot.port, slot.base_gpu_id) if server_cmd is not None
                   else server_command(model_path, slot.port, cfg, host=slot.host, base_gpu_id=slot.base_gpu_id))
            group.servers.append(start_process(f"sglang-server-{slot.node}-{slot.index}", cmd, log_dir, env))
            group.worker_urls.append(slot.url)
        for url, proc in zip(group.worker_urls, group.servers):  # they start in parallel
            wait_healthy(url, timeout_s=startup_timeout_s, process=proc)
    except BaseException:
        group.close()
        raise
    return group


def launch_router(worker_urls: Sequence[str], *, host: str, port: int, log_dir: str | Path,
                  startup_timeout_s: float = 300.0, policy: str = "cache_aware",
                  env: dict[str, str] | None = None) -> ManagedProcess:
    """Start ``sglang_router`` over ``worker_urls`` on ``host:port``; wait until all are healthy."""
    proc = start_process("sglang-router", router_command(worker_urls, port, host=host, policy=policy),
                         log_dir, env)
    try:
        wait_healthy(f"http://{host}:{port}", timeout_s=startup_timeout_s, process=proc, poll_s=0.5,
                     expect_workers=len(worker_urls))
    except BaseException:
        proc.stop()
        raise
    return proc


def launch_server_group(model_path: str, cfg, *, host: str = "127.0.0.1",
                        log_dir: str | Path | None = None, startup_timeout_s: float = 900.0,
                        router: bool = True, router_policy: str = "cache_aware",
                        port_stride: int | None = None,
                        server_cmd: Callable[[int, int], list[str]] | None = None,
                        env: dict[str, str] | None = None) -> ServerGroup:
    """One node: ``cfg.servers_per_node`` servers (at least one) on ``cfg.port_base + i*port_stride``
    and a router on ``cfg.router_port``; returns once all serve. ``server_cmd(port, base_gpu_id)``
    replaces the SGLang command (tests start :mod:`~tests.doubles.fake_sglang` servers this way)."""
    from delta_megatron.topology import ServerSlot

    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="dm-sglang-"))
    stride = port_stride or cfg.port_stride
    slots = [ServerSlot(node=0, index=i, gpu_ids=tuple(range(i * cfg.tp, (i + 1) * cfg.tp)), host=host,
                        port=cfg.port_base + i * stride, dp_attention=cfg.dp_attention, launcher_rank=0)
             for i in range(cfg.servers_per_node or 1)]
    group = launch_servers(model_path, cfg, slots, log_dir=log_dir, startup_timeout_s=startup_timeout_s,
                           env=env, server_cmd=server_cmd)
    if router:
        try:
            group.router = launch_router(group.worker_urls, host=host, port=cfg.router_port, log_dir=log_dir,
                                         startup_timeout_s=min(startup_timeout_s, 300.0), policy=router_policy,
                                         env=env)
        except BaseException:
            group.close()
            raise
        group.router_url = f"http://{host}:{cfg.router_port}"
    return group
