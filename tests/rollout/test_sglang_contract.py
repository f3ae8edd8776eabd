"""The SGLang client held to the real server's contract, read from the pinned release (no GPU, no import).

The released wheel is fetched with ``pip download --no-deps`` (cached under ~/.cache/delta-megatron);
its ``http_server.py`` routes, ``io_struct.py`` request dataclasses and ``SamplingParams`` arguments
are read with ``ast`` and must equal the schema the fake server enforces (tests/doubles/
sglang_schema.json). Then every request the client sends — generation, abort, pause/resume, flush,
all three weight-sync paths, ``check_weights``, memory release/resume — is recorded and checked:
routes exist with the method used, no field the dataclass lacks, every required field present.
Without network the schema test skips, except under ``CI=true``, where it fails.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest

from delta_megatron.config import SGLangConfig
from delta_megatron.rollout.engine import GenerateRequest, SamplingParams
from delta_megatron.rollout.sglang_engine import SGLangEngine
from delta_megatron.rollout.weight_sync import DiskSync, DistributedSync
from tests.doubles.fake_sglang import FakeSGLangServer
from tests.doubles.sglang_schema import (
    SGLANG_VERSION,
    check_body,
    fetch_wheel,
    load_schema,
    schema_from_wheel,
)
from tests.rollout.tiny import EOS, PAD, tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel():
    try:
        return fetch_wheel()
    except Exception as err:  # no network: fine on a laptop, a failure in CI
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI: cannot fetch sglang=={SGLANG_VERSION}: {err}")
        pytest.skip(f"cannot fetch sglang=={SGLANG_VERSION}: {err}")


def test_fake_schema_is_the_pinned_release(wheel):
    assert schema_from_wheel(wheel) == load_schema(), (
        "tests/doubles/sglang_schema.json differs from the release: python -m tests.doubles.sglang_schema --write")
    assert load_schema()["version"] == SGLANG_VERSION


def test_gpu_extra_pins_the_release_the_contract_covers():
    (line,) = re.findall(r"(?m)^gpu = \[.*\]", (ROOT / "pyproject.toml").read_text())
    pins = re.findall(r'"sglang([^-"][^"]*)"', line)
    assert pins == [f"=={SGLANG_VERSION}"], line


def test_routes_we_rely_on_exist_with_their_methods():
    routes = load_schema()["routes"]
    assert all(routes[p] is not None for p in routes), [p for p in routes if routes[p] is None]
    assert routes["/pause_generation"]["body"] == "PauseGenerationReqInput"  # `mode` is honoured
    assert "mode" in load_schema()["requests"]["PauseGenerationReqInput"]
    for path in ("/release_memory_occupation", "/resume_memory_occupation"):
        assert "POST" in routes[path]["methods"]
        assert "tags" in load_schema()["requests"][routes[path]["body"]]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_request_the_client_sends_fits_the_release(tmp_path):
    """Drive every client call against a fake server process (which already refuses a bad body) and
    re-check each recorded body strictly (no router in between)."""
    import sys

    from delta_megatron.rollout.sglang_server import start_process, wait_healthy

    tiny_model(0).save_pretrained(tmp_path / "hf")
    state = {n: t + 0.1 for n, t in tiny_model(0).state_dict().items() if n != "lm_head.weight"}
    cfg = SGLangConfig(request_timeout_s=60, max_retries=1, max_concurrency=4, check_weights=True)
    port = _port()
    fake = start_process("fake", [sys.executable, "-m", "tests.doubles.fake_sglang", "--model-path",
                                  str(tmp_path / "hf"), "--port", str(port), "--pad-token-id", str(PAD),
                                  "--eos-token-id", str(EOS), "--max-lifetime-s", "120"], tmp_path,
                         env={"PYTHONPATH": str(ROOT)})
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, timeout_s=120, process=fake, poll_s=0.2)
        engine = SGLangEngine(None, [url], config=cfg, backoff_s=0.01)
        seeded = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=4,
                                stop_token_ids=(3,), seed=1)
        engine.generate([GenerateRequest("g", [5, 6], seeded)])
        engine.abort(None)
        engine.update_weights(state.items())  # ipc: pause, tensors, flush, resume, check_weights
        engine.weight_sync = DiskSync(tmp_path / "disk")
        engine.update_weights(state.items())
        engine.update_weights_from_disk(tmp_path / "disk")
        engine.weight_sync = DistributedSync("127.0.0.1", _port(), backend="gloo", timeout_s=60)
        engine.update_weights(state.items())  # check_weights reads the broadcast copy back
        engine.post_all("/release_memory_occupation", {"tags": ["kv_cache", "weights"]})
        engine.post_all("/resume_memory_occupation", {"tags": ["kv_cache", "weights"]})
        engine.close()  # destroys the weight-update group
        sent = [(r["method"], r["path"], r["body"]) for r in engine.http.get(f"{url}/_fake/requests")]
    finally:
        fake.stop(timeout_s=10)
    routes = load_schema()["routes"]
    for method, path, body in sent:
        assert method in routes[path]["methods"], (method, path)
        assert check_body(path, body, via_router=False) is None, (path, body, check_body(path, body))
    assert {p for _, p, _ in sent} >= {
        "/generate", "/abort_request", "/pause_generation", "/continue_generation", "/flush_cache",
        "/update_weights_from_tensor", "/update_weights_from_disk", "/init_weights_update_group",
        "/update_weights_from_distributed", "/destroy_weights_update_group", "/get_weights_by_name",
        "/release_memory_occupation", "/resume_memory_occupation"}


@pytest.mark.parametrize("path, body, reason", [
    ("/pause_generation", {"mode": "abort", "drain": True}, "has no field(s) ['drain']"),
    ("/init_weights_update_group", {"master_address": "a", "rank_offset": 1, "world_size": 2},
     "requires field(s) ['master_port']"),
    ("/generate", {"input_ids": [1], "sampling_params": {"seed": 3}}, "SamplingParams of sglang"),
    ("/generate", {"input_ids": [1], "model": "x"}, "has no field(s) ['model']"),
    ("/flush_cache", {"all": True}, "takes no request body"),
])
def test_fake_refuses_what_the_release_lacks(path, body, reason):
    import json
    import urllib.error
    import urllib.request

    with FakeSGLangServer(tiny_model(0), PAD, EOS, max_lifetime_s=60) as fake:
        req = urllib.request.Request(fake.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 400 and reason in json.loads(err.value.read())["message"]
