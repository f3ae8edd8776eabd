"""Fault corpus, servers: a frozen (SIGSTOP), a killed (SIGKILL), a trickling and a dead-behind-a-router
server are each reported within the bound the config sets, with an error that names the server, and
the engine keeps working once the server is back.

Bounds: a frozen server within ``request_timeout_s × (max_retries + 1)`` plus the backoff sleeps
(``HttpClient.deadline_s``), a dead one within ``health_interval_s``; ``SLACK`` covers thread and
process scheduling on a loaded 2-core CI machine, not the client's own waiting.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import pytest

from delta_megatron.config import SGLangConfig
from delta_megatron.rollout._http import HttpClient
from delta_megatron.rollout.engine import GenerateRequest, RequestFailed, RolloutError, SamplingParams
from delta_megatron.rollout.sglang_engine import SGLangEngine
from delta_megatron.rollout.sglang_server import launch_server_group
from tests.doubles.fake_sglang import FakeSGLangServer
from tests.rollout.tiny import EOS, PAD, tiny_model

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=4)
SLACK = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine(urls, timeout, retries, health=30.0, router=None) -> SGLangEngine:
    cfg = SGLangConfig(request_timeout_s=timeout, max_retries=retries, max_concurrency=4,
                       health_interval_s=health)
    return SGLangEngine(router, urls, config=cfg, backoff_s=0.05)


def _timed(fn):
    t0 = time.monotonic()
    try:
        fn()
    except RolloutError as err:
        return time.monotonic() - t0, str(err)
    raise AssertionError("no error raised")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-hf")
    tiny_model(0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def _servers(model_dir, tmp_path_factory):
    """Fake SGLang servers in their own processes (so they can be frozen and killed); one is started
    only when the previous one was killed (a start costs ~5-30 s of torch import on a busy CI box)."""
    groups = []

    def cmd(port, _gpu):
        return [sys.executable, "-m", "tests.doubles.fake_sglang", "--model-path", str(model_dir),
                "--port", str(port), "--pad-token-id", str(PAD), "--eos-token-id", str(EOS),
                "--max-lifetime-s", "300"]

    def live():
        if not groups or groups[-1].servers[0].proc.poll() is not None:
            groups.append(launch_server_group(
                str(model_dir), SGLangConfig(port_base=_free_port()), startup_timeout_s=180, router=False,
                log_dir=tmp_path_factory.mktemp("fake-sglang-logs"), server_cmd=cmd))
        return groups[-1]

    yield live
    for group in groups:
        proc = group.servers[0].proc
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)
        group.close()


@pytest.fixture
def server(_servers):
    group = _servers()
    return group.worker_urls[0], group.servers[0].proc


@pytest.mark.slow
@pytest.mark.parametrize("timeout,retries", [(1.0, 1), (0.5, 3)])
def test_frozen_server_reported_within_its_deadline(server, timeout, retries):
    url, proc = server
    patient = _engine([url], 120.0, 0)  # for the checks before and after (a loaded CI box is slow)
    first = patient.generate([GenerateRequest("a", [5, 6], GREEDY)])  # it serves
    engine = _engine([url], timeout, retries)
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        elapsed, msg = _timed(lambda: engine.generate([GenerateRequest(f"r{i}", [5, 6], GREEDY)
                                                       for i in range(3)]))
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    bound = engine.http.deadline_s()
    assert bound == pytest.approx(timeout * (retries + 1) + 1.2 * sum(0.05 * 2**k for k in range(retries)))
    assert timeout * (retries + 1) * 0.9 <= elapsed <= bound + SLACK, (elapsed, bound)
    assert f"{url}/generate timed out after {retries + 1} attempt(s)" in msg
    again = patient.generate([GenerateRequest("a", [5, 6], GREEDY)])  # thawed: it serves as before
    assert again[0].response_ids == first[0].response_ids
    engine.close()
    patient.close()


@pytest.mark.slow
def test_killed_server_reported_within_health_interval(server):
    url, proc = server
    engine = _engine([url], timeout=120.0, retries=3, health=0.5)
    engine.generate([GenerateRequest("a", [5, 6], GREEDY)])
    threading.Timer(0.3, lambda: os.killpg(proc.pid, signal.SIGKILL)).start()
    elapsed, msg = _timed(lambda: [engine.generate([GenerateRequest(f"r{i}", [5, 6], GREEDY)])
                                   for i in range(10**6)])
    assert elapsed <= 0.3 + engine.health_interval_s + engine.http.backoff_total_s(3) + SLACK
    assert url in msg
    assert not engine.health()
    engine.close()


def test_dead_worker_behind_a_live_router_is_found_by_health_probes():
    """The router (here: a server whose /generate hangs) keeps the request; the monitor sees the dead
    worker within one health interval although the request's own deadline is minutes away."""
    dead = f"http://127.0.0.1:{_free_port()}"
    with FakeSGLangServer(tiny_model(0), PAD, EOS, max_lifetime_s=60) as router:
        router.hang_next("/generate")
        engine = _engine([dead], timeout=120.0, retries=2, health=0.3, router=router.url)
        elapsed, msg = _timed(lambda: engine.generate([GenerateRequest("x", [5], GREEDY)]))
        engine.close()
    assert elapsed <= 0.3 + SLACK
    assert "server not answering (dead?)" in msg and dead in msg


def _trickle_server(stop: threading.Event) -> int:
    """Answers every request with headers for 10^6 bytes, then one byte every 50 ms."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")
            try:
                while not stop.wait(0.05):
                    conn.sendall(b" ")
            except OSError:
                pass
            conn.close()
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


def test_trickling_server_is_cut_at_the_total_deadline():
    """Every socket read succeeds within the timeout, so only the total deadline can stop it."""
    stop = threading.Event()
    port = _trickle_server(stop)
    client = HttpClient(timeout_s=0.5, max_retries=1, backoff_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(RequestFailed, match=r"timed out after 2 attempt\(s\).*attempt cut off after"):
        client.get(f"http://127.0.0.1:{port}/x")
    elapsed = time.monotonic() - t0
    stop.set()
    client.close()
    assert 0.5 <= elapsed <= client.deadline_s() + SLACK


@pytest.mark.parametrize("retries", [0, 2])
def test_refused_connection_fails_after_backoff_only(retries):
    client = HttpClient(timeout_s=60.0, max_retries=retries, backoff_s=0.05)
    t0 = time.monotonic()
    with pytest.raises(RequestFailed, match=rf"failed after {retries + 1} attempt\(s\).*ConnectionRefused"):
        client.post(f"http://127.0.0.1:{_free_port()}/generate", {})
    assert time.monotonic() - t0 <= client.backoff_total_s(retries) + SLACK


def test_wait_healthy_on_a_hung_server_ends_at_its_deadline():
    from delta_megatron.rollout.sglang_server import wait_healthy

    with FakeSGLangServer(tiny_model(0), PAD, EOS, max_lifetime_s=60) as fake:
        fake.hang_next("/health", 100)
        t0 = time.monotonic()
        with pytest.raises(RolloutError, match=rf"{fake.url}/health not healthy after 1.5 s \(TimeoutError"):
            wait_healthy(fake.url, timeout_s=1.5, poll_s=0.2, probe_timeout_s=0.6)
        elapsed = time.monotonic() - t0
    assert 1.5 <= elapsed <= 1.5 + SLACK
    assert len(fake.calls("/health")) >= 2  # it kept probing until the deadline
