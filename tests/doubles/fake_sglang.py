"""A local stand-in for an SGLang server: SGLang's HTTP paths and JSON fields, a real HF model behind.

SGLang cannot run on the CPU machine, so the SGLang client is tested against this server. It follows
SGLang's ``http_server.py`` / ``io_struct.py`` field by field for the endpoints the engine uses
(``/generate`` with ``input_ids`` + ``sampling_params`` + ``return_logprob`` → ``meta_info``
``finish_reason`` / ``output_token_logprobs``; ``/abort_request``; ``/pause_generation``;
``/continue_generation``; ``/flush_cache``; ``/update_weights_from_{tensor,disk,distributed}``;
``/init_weights_update_group``; ``/get_weights_by_name``; ``/release_memory_occupation`` and
``/resume_memory_occupation`` with ``tags`` (``ReleaseMemoryOccupationReqInput``: ``None`` = every
tag; success answers JSON ``null``, a failure 400 ``{"error": {"message"}}`` as SGLang's
``_create_error_response``); ``/health``; model/server info — also the
``/model_info`` and ``/server_info`` spellings ``sglang_router`` 0.3 asks workers for), so the real
``sglang_router`` can route to it. Generation is an :class:`EmbeddedEngine` on the given model.

Every request body is checked against the request dataclasses of the pinned SGLang release
(:mod:`tests.doubles.sglang_schema`): a field the real dataclass lacks, a missing required field or an
unknown sampling parameter is answered 400 with the reason (the real server would drop an unknown
field silently), so every client test also holds the client to SGLang's contract.

Test knobs: ``latency_s``, ``fail_next(path, n, status)`` (500s), ``hang_next(path, n)`` (for
timeouts), ``gate_generate`` (hold generations until ``open_gate()`` or an abort). It binds the one
address it is given (127.0.0.1 by default; a cluster test's node address), bounds concurrent handlers,
and stops by itself after ``max_lifetime_s``.

Run standalone (e.g. as a drop-in for a launch test)::

    python -m tests.doubles.fake_sglang --model-path DIR --port 30000 --pad-token-id 0
"""

from __future__ import annotations

import argparse
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from delta_megatron.rollout.embedded import EmbeddedEngine
from delta_megatron.rollout.engine import GenerateRequest, SamplingParams
from delta_megatron.rollout.weight_sync import deserialize_named_tensors, init_custom_process_group
from tests.doubles.sglang_schema import check_body

__all__ = ["FakeSGLangServer"]

_FLUSHED = ("Cache flushed.\nPlease check backend logs for more details. (When there are running or "
            "waiting requests, the operation will not be performed.)\n")


class _Reply:
    def __init__(self, status: int, body: Any):
        self.status, self.body = status, body


def _error(status: int, message: str) -> _Reply:  # SGLang's ErrorResponse shape
    return _Reply(status, {"object": "error", "message": message, "type": "BadRequest",
                           "param": None, "code": status})


class FakeSGLangServer:
    """One fake SGLang server (TP 1) on ``host``; use as a context manager or ``start``/``stop``."""

    def __init__(self, model: torch.nn.Module, pad_token_id: int, eos_token_id=None, *,
                 port: int = 0, host: str = "127.0.0.1", model_path: str = "fake-model", tp_size: int = 1,
                 max_lifetime_s: float = 300.0, max_concurrency: int = 32, latency_s: float = 0.0,
                 gate_generate: bool = False):
        self.engine = EmbeddedEngine(model, pad_token_id, eos_token_id, batch_size=64)
        self.port, self.host, self.model_path, self.tp_size = port, host, model_path, tp_size
        self.max_lifetime_s, self.latency_s = max_lifetime_s, latency_s
        self.requests: list[dict[str, Any]] = []
        self.paused = False
        self.weight_version = "default"
        self._faults: dict[str, list[tuple[str, int]]] = {}
        self._cv = threading.Condition()
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._stop = threading.Event()
        self._gate = threading.Event()
        if not gate_generate:
            self._gate.set()
        self._live: set[str] = set()
        self._aborted: set[str] = set()
        self._groups: dict[str, Any] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._routes = {
            ("GET", "/health"): self._health, ("GET", "/health_generate"): self._health,
            ("GET", "/get_model_info"): self._model_info, ("GET", "/model_info"): self._model_info,
            ("GET", "/get_server_info"): self._server_info, ("GET", "/server_info"): self._server_info,
            ("GET", "/get_weight_version"): lambda b: _Reply(200, {"weight_version": self.weight_version}),
            ("POST", "/generate"): self._generate, ("PUT", "/generate"): self._generate,
            ("POST", "/abort_request"): self._abort,
            ("POST", "/pause_generation"): self._pause,
            ("POST", "/continue_generation"): self._continue,
            ("GET", "/flush_cache"): self._flush, ("POST", "/flush_cache"): self._flush,
            ("POST", "/update_weights_from_tensor"): self._from_tensor,
            ("POST", "/update_weights_from_disk"): self._from_disk,
            ("POST", "/init_weights_update_group"): self._init_group,
            ("POST", "/update_weights_from_distributed"): self._from_distributed,
            ("POST", "/destroy_weights_update_group"): self._destroy_group,
            ("POST", "/release_memory_occupation"): self._release_memory,
            ("GET", "/release_memory_occupation"): self._release_memory,
            ("POST", "/resume_memory_occupation"): self._resume_memory,
            ("GET", "/resume_memory_occupation"): self._resume_memory,
            ("GET", "/get_weights_by_name"): self._weights_by_name,
            ("POST", "/get_weights_by_name"): self._weights_by_name,
            ("GET", "/_fake/requests"): self._log,
        }

    # ------------------------------------------------------------------ lifecycle and knobs
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeSGLangServer:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                reply = fake._dispatch(self.command, self.path.split("?")[0], raw)
                if isinstance(reply.body, str):
                    data, ctype = reply.body.encode(), "text/plain; charset=utf-8"
                else:
                    data, ctype = json.dumps(reply.body).encode(), "application/json"
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout or cancel)
                    pass

            do_GET = do_POST = do_PUT = _serve

            def log_message(self, *args) -> None:
                pass

        self._httpd = ThreadingHTTPServer((self.host, self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(target=self._httpd.serve_forever, name=f"fake-sglang-{self.port}",
                         daemon=True).start()
        timer = threading.Timer(self.max_lifetime_s, self.stop)
        timer.daemon = True
        timer.start()
        return self

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._gate.set()
        with self._cv:
            self._cv.notify_all()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        self.engine.close()

    def __enter__(self) -> FakeSGLangServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def fail_next(self, path: str, count: int = 1, status: int = 500) -> None:
        """The next ``count`` requests to ``path`` answer ``status`` without doing anything."""
        with self._cv:
            self._faults.setdefault(path, []).extend([("fail", status)] * count)

    def hang_next(self, path: str, count: int = 1) -> None:
        """The next ``count`` requests to ``path`` never answer (until the server stops)."""
        with self._cv:
            self._faults.setdefault(path, []).extend([("hang", 0)] * count)

    def open_gate(self) -> None:
        self._gate.set()

    def calls(self, path: str) -> list[dict[str, Any]]:
        with self._cv:
            return [r["body"] for r in self.requests if r["path"] == path]

    def wait_for(self, path: str, count: int, timeout: float = 60.0) -> bool:
        """Block until ``count`` requests to ``path`` have arrived (synchronises tests, no sleeps)."""
        with self._cv:
            return self._cv.wait_for(
                lambda: sum(r["path"] == path for r in self.requests) >= count, timeout)

    # ------------------------------------------------------------------ dispatch
    def _dispatch(self, method: str, path: str, raw: bytes) -> _Reply:
        route = self._routes.get((method, path))
        if route is None:
            known = any(p == path for _, p in self._routes)
            return _Reply(405 if known else 404, {"detail": "Method Not Allowed" if known else "Not Found"})
        try:
            body = json.loads(raw) if raw else {}
        except json.JSONDecodeError as err:
            return _error(400, f"invalid JSON: {err}")
        with self._cv:
            self.requests.append({"method": method, "path": path, "body": body})
            fault = self._faults[path].pop(0) if self._faults.get(path) else None
            self._cv.notify_all()
        problem = None if path.startswith("/_fake/") else check_body(path, body)
        if problem is not None:
            return _error(400, f"contract: {problem}")
        if fault is not None and fault[0] == "hang":
            self._stop.wait()
            return _Reply(503, {"detail": "server stopped"})
        if fault is not None:
            return _error(fault[1], f"injected failure on {path}")
        if not self._slots.acquire(timeout=self.max_lifetime_s):
            return _Reply(503, {"detail": "too many concurrent requests"})
        try:
            return route(body)
        except Exception as err:  # a handler bug must still answer
            return _error(400, f"{type(err).__name__}: {err}")
        finally:
            self._slots.release()

    def _health(self, body) -> _Reply:
        return _Reply(200, "")

    def _model_info(self, body) -> _Reply:
        return _Reply(200, {"model_path": self.model_path, "tokenizer_path": self.model_path,
                            "is_generation": True, "preferred_sampling_params": None,
                            "weight_version": self.weight_version})

    def _server_info(self, body) -> _Reply:
        return _Reply(200, {"model_path": self.model_path, "tp_size": self.tp_size, "dp_size": 1,
                            "version": "fake", "internal_states": []})

    def _log(self, body) -> _Reply:
        def short(v):
            if isinstance(v, str) and len(v) > 64:
                return v[:64] + "..."
            if isinstance(v, list):
                return [short(x) for x in v]
            if isinstance(v, dict):
                return {k: short(x) for k, x in v.items()}
            return v
        with self._cv:
            return _Reply(200, [{"method": r["method"], "path": r["path"], "body": short(r["body"])}
                                for r in self.requests
                                if r["path"] != "/_fake/requests"])

    # ------------------------------------------------------------------ generation
    def _generate(self, body: dict) -> _Reply:
        input_ids = body.get("input_ids")
        if not input_ids:
            return _error(400, "the fake server takes input_ids only (no text, no tokenizer)")
        if isinstance(input_ids[0], list) or body.get("stream"):
            return _error(400, "the fake server takes one prompt per request and no streaming")
        sp = body.get("sampling_params") or {}
        rid = str(body.get("rid") or uuid.uuid4().hex)
        with self._cv:
            self._live.add(rid)
        try:
            with self._cv:
                self._cv.wait_for(lambda: not self.paused or self._stop.is_set())
            while not self._gate.wait(0.05):  # poll: an abort must release a gated request
                if self._is_aborted(rid) or self._stop.is_set():
                    break
            if self.latency_s:
                self._stop.wait(self.latency_s)
            if self._is_aborted(rid):
                return _Reply(200, self._output(rid, input_ids, [], [], "abort", body))
            params = SamplingParams(
                temperature=float(sp.get("temperature", 1.0)), top_p=float(sp.get("top_p", 1.0)),
                top_k=int(sp.get("top_k", -1)), max_new_tokens=int(sp.get("max_new_tokens", 128)),
                stop_token_ids=tuple(sp.get("stop_token_ids") or ()), n=int(sp.get("n", 1)),
                seed=sp.get("sampling_seed"))
            samples = self.engine.generate([GenerateRequest(rid, list(input_ids), params)])
        finally:
            with self._cv:
                self._live.discard(rid)
                self._aborted.discard(rid)
        outs = [self._output(rid if len(samples) == 1 else f"{rid}_{s.index}", input_ids,
                             s.response_ids, s.logprobs, s.finish_reason, body) for s in samples]
        return _Reply(200, outs[0] if len(outs) == 1 else outs)

    def _output(self, rid, prompt, tokens, logprobs, reason, body) -> dict:
        if reason == "stop":
            finish = {"type": "stop", "matched": tokens[-1]}
        elif reason == "length":
            finish = {"type": "length", "length": len(tokens)}
        else:
            finish = {"type": "abort", "message": "Abort before prefill" if not tokens else "Abort"}
        meta = {"id": rid, "finish_reason": finish, "prompt_tokens": len(prompt),
                "completion_tokens": len(tokens), "cached_tokens": 0,
                "weight_version": self.weight_version}
        if body.get("return_logprob"):
            meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok in zip(logprobs, tokens)]
        return {"text": "", "output_ids": list(tokens), "meta_info": meta}

    def _is_aborted(self, rid: str) -> bool:
        with self._cv:
            return rid in self._aborted

    def _abort(self, body: dict) -> _Reply:
        with self._cv:
            rids = set(self._live) if body.get("abort_all") else {body.get("rid", "")} & self._live
            self._aborted |= rids
        self.engine.abort(list(rids))
        return _Reply(200, "")

    def _pause(self, body: dict) -> _Reply:
        with self._cv:
            self.paused = True
        if body.get("mode", "abort") == "abort":
            self._abort({"abort_all": True})
        return _Reply(200, {"message": "Generation paused successfully.", "status": "ok"})

    def _continue(self, body: dict) -> _Reply:
        with self._cv:
            self.paused = False
            self._cv.notify_all()
        return _Reply(200, {"message": "Generation continued successfully.", "status": "ok"})

    def _flush(self, body) -> _Reply:
        return _Reply(200, _FLUSHED)

    # ------------------------------------------------------------------ memory occupation
    def _memory(self, body: dict, action) -> _Reply:
        extra = set(body) - {"tags"}
        if extra:  # SGLang's request dataclass has no other field
            return _Reply(400, {"error": {"message": f"unexpected fields {sorted(extra)}"}})
        try:
            action(body.get("tags"))
        except Exception as err:
            return _Reply(400, {"error": {"message": str(err)}})
        return _Reply(200, None)

    def _release_memory(self, body: dict) -> _Reply:
        return self._memory(body, self.engine.release_memory_occupation)

    def _resume_memory(self, body: dict) -> _Reply:
        return self._memory(body, self.engine.resume_memory_occupation)

    # ------------------------------------------------------------------ weights
    def _updated(self, body: dict, extra: dict | None = None, message: str = "Success") -> _Reply:
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
        return _Reply(200, {"success": True, "message": message, **(extra or {})})

    def _from_tensor(self, body: dict) -> _Reply:
        entries = body.get("serialized_named_tensors")
        if not isinstance(entries, list) or len(entries) != self.tp_size:
            return _Reply(400, {"success": False, "message":
                                f"serialized_named_tensors must be a list of {self.tp_size} entries"})
        if body.get("load_format") not in (None, "direct"):
            return _Reply(400, {"success": False, "message": f"unknown load_format {body['load_format']}"})
        try:
            self.engine.update_weights(deserialize_named_tensors(entries[0]), allow_partial=True)
        except Exception as err:
            return _Reply(400, {"success": False, "message": f"Failed to update weights: {err}"})
        return self._updated(body)

    def _from_disk(self, body: dict) -> _Reply:
        try:
            self.engine.update_weights_from_disk(body["model_path"])
        except Exception as err:
            return _Reply(400, {"success": False, "message": f"Failed to load weights: {err}",
                                "num_paused_requests": 0})
        return self._updated(body, {"num_paused_requests": 0}, "Succeeded to update model weights.")

    def _init_group(self, body: dict) -> _Reply:
        name = body.get("group_name", "weight_update_group")
        try:
            self._groups[name] = init_custom_process_group(
                body.get("backend", "nccl"), f"tcp://{body['master_address']}:{body['master_port']}",
                int(body["world_size"]), int(body["rank_offset"]), name)
        except Exception as err:
            return _Reply(400, {"success": False,
                                "message": f"Failed to initialize custom process group: {err}."})
        return _Reply(200, {"success": True, "message": "Succeeded to initialize custom process group."})

    def _from_distributed(self, body: dict) -> _Reply:
        import torch.distributed as dist

        group = self._groups.get(body.get("group_name", "weight_update_group"))
        if group is None:
            return _Reply(400, {"success": False, "message": "call /init_weights_update_group first"})
        try:
            received, handles = [], []
            for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
                tensor = torch.empty(shape, dtype=getattr(torch, dtype))
                handles.append(dist.broadcast(tensor, src=0, group=group, async_op=True))
                received.append((name, tensor))
            for handle in handles:
                handle.wait()
            self.engine.update_weights(received, allow_partial=True)
        except Exception as err:
            return _Reply(400, {"success": False, "message": f"Failed to update parameter online: {err}"})
        return self._updated(body, message="Succeeded to update parameter online.")

    def _destroy_group(self, body: dict) -> _Reply:
        import torch.distributed as dist

        group = self._groups.pop(body.get("group_name", "weight_update_group"), None)
        if group is None:
            return _Reply(400, {"success": False, "message": "The group to be destroyed does not exist."})
        dist.destroy_process_group(group)
        return _Reply(200, {"success": True, "message": "Succeeded to destroy custom process group."})

    def _weights_by_name(self, body: dict) -> _Reply:
        state = self.engine.model.state_dict()
        tensor = state.get(body.get("name", ""))
        if tensor is None:
            return _error(400, "Get parameter by name failed")
        return _Reply(200, tensor.float().tolist()[: int(body.get("truncate_size", 100))])


def main(argv: list[str] | None = None) -> None:
    """SGLang's server CLI (``--model-path --host --port``; other SGLang flags are accepted and
    ignored), so the trainer starts it through ``rollout.sglang.server_module``. Pad / EOS ids come
    from the model's config unless given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", required=True, help="HF checkpoint directory")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--host", default="127.0.0.1", help="the node's own address (never 0.0.0.0 in tests)")
    parser.add_argument("--pad-token-id", type=int, default=None)
    parser.add_argument("--eos-token-id", type=int, default=None)
    parser.add_argument("--max-lifetime-s", type=float, default=600.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models)")
    args, _sglang_args = parser.parse_known_args(argv)  # ignore --tp-size, --mem-fraction-static, ...
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32)
    with torch.no_grad():  # own the memory: mmap-backed safetensors storage cannot be released (resized)
        for param in model.parameters():
            param.data = param.data.clone()
    pad = args.pad_token_id if args.pad_token_id is not None else (model.config.pad_token_id or 0)
    eos = args.eos_token_id if args.eos_token_id is not None else model.config.eos_token_id
    server = FakeSGLangServer(model, pad, eos, port=args.port, host=args.host, model_path=args.model_path,
                              max_lifetime_s=args.max_lifetime_s).start()
    print(f"FAKE_SGLANG_READY {server.url}", flush=True)
    server._stop.wait()


if __name__ == "__main__":
    main()
