"""The SGLang rollout engine: generation through ``sglang_router``, control of each server directly.

Data plane: one ``/generate`` request per sample (``input_ids``, ``sampling_params``,
``return_logprob``; ``meta_info.output_token_logprobs`` / ``finish_reason`` parsed back) sent to the
router, at most ``max_concurrency`` at a time, each with a timeout and retries (a timed-out request is
aborted on the servers and re-sent under a fresh ``rid``). ``abort`` asks every server to
``/abort_request`` the samples' rids; SGLang then answers them with ``finish_reason.type == "abort"``
and the tokens generated so far, which come back as partial samples for a
:class:`~delta_megatron.rollout.engine.PartialRolloutBuffer`.

Control plane: the router (sglang_router 0.3) forwards ``/generate`` and ``/flush_cache`` only, so
pause / weight updates / checks go to every worker URL (``GET /workers`` on the router, or the URLs
given). A weight update is pause → strategy push (:mod:`~delta_megatron.rollout.weight_sync`) →
flush → resume; on any failure the servers are resumed and a :class:`WeightSyncError` says what failed
where. ``check_weights`` compares the servers' weights (``/get_weights_by_name``) with the trainer's.
Colocated, ``/release_memory_occupation`` and ``/resume_memory_occupation`` (``tags``) give the
servers' weights and KV pool back to the actor between rollouts (servers started with
``--enable-memory-saver``, see ``SGLangConfig.memory_saver``).

Faults are reported in bounded time, all derived from the config: every HTTP call has a total deadline
(``request_timeout_s × (max_retries + 1)`` plus backoff sleeps, see ``_http.HttpClient``), the abort
of a stale attempt before its retry runs in the background and never delays the retry, a failed
``generate`` cancels its other requests client-side at once (a frozen server cannot hold them), and
while ``generate`` runs a monitor probes every server's ``/health`` each ``health_interval_s``: a
server that refuses connections (dead) fails the call within that interval even when a router hides it.
"""

from __future__ import annotations

import http.client
import itertools
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from delta_megatron.rollout._http import HttpClient, RequestCancelled
from delta_megatron.rollout.engine import (
    GenerateRequest,
    RequestFailed,
    RolloutError,
    Sample,
    WeightSyncError,
    check_memory_tags,
    room_in_context,
    sample_slots,
    weight_update_window,
)
from delta_megatron.rollout.weight_sync import NoWeightSync, WeightSync, load_from_disk, make_weight_sync

__all__ = ["SGLangEngine"]


class _Dead(RequestFailed):
    """A health probe found a server refusing connections."""


def _probe(call):
    """``call()``; a connection refused or reset (the server process is gone) becomes :class:`_Dead`."""
    try:
        return call()
    except RequestFailed as err:
        if isinstance(err.__cause__, (ConnectionRefusedError, ConnectionResetError,
                                      http.client.RemoteDisconnected)):
            raise _Dead(f"server not answering (dead?): {err}") from err
        raise


class SGLangEngine:
    """A :class:`~delta_megatron.rollout.engine.RolloutEngine` over SGLang servers.

    ``router_url`` may be ``None`` to round-robin over ``worker_urls`` without a router.
    ``config`` is an :class:`~delta_megatron.rollout.config.SGLangConfig`; ``weight_sync`` defaults to the
    strategy it names (``ipc``; ``distributed``/``disk`` need addresses: the trainer's weight route
    builds them from the placement, see :mod:`~delta_megatron.rollout.placement`). ``pause_mode`` is SGLang's
    ``/pause_generation`` mode: ``abort`` (in-flight samples return partial), ``retract`` or
    ``in_place``. Extra keyword arguments are accepted and ignored.
    """

    def __init__(self, router_url: str | None, worker_urls: Sequence[str] | None = None, *,
                 config=None, weight_sync: WeightSync | None = None, servers=None,
                 pause_mode: str = "abort", check_weights: bool | None = None,
                 check_truncate: int = 100, check_atol: float = 0.0, backoff_s: float = 0.5,
                 control_timeout_s: float | None = None, context_len: int | None = None, **_ignored):
        from delta_megatron.rollout.config import SGLangConfig

        cfg = config or SGLangConfig()
        if router_url is None and not worker_urls:
            raise ValueError("SGLangEngine needs a router_url or worker_urls")
        self.config = cfg
        self.router_url = router_url.rstrip("/") if router_url else None
        self._given_workers = [u.rstrip("/") for u in worker_urls] if worker_urls else None
        self.http = HttpClient(cfg.request_timeout_s, cfg.max_retries, backoff_s=backoff_s)
        self.control_timeout_s = control_timeout_s or cfg.request_timeout_s
        self.health_interval_s = cfg.health_interval_s
        self.context_len = context_len  # the model's max_position_embeddings: generation stops there
        if weight_sync is None:  # distributed / disk senders are built by the trainer's weight route
            weight_sync = (make_weight_sync(cfg) if cfg.weight_sync in ("auto", "ipc")
                           else NoWeightSync(f"weight_sync={cfg.weight_sync}: pushed by the weight route"))
        self.weight_sync = weight_sync
        self.pause_mode = pause_mode
        self.check_weights_after_sync = cfg.check_weights if check_weights is None else check_weights
        self.check_truncate, self.check_atol = check_truncate, check_atol
        self.servers = servers  # a ServerGroup this engine launched (closed with it)
        self.weight_version = 0
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="dm-gen")
        self._control = ThreadPoolExecutor(max_workers=16, thread_name_prefix="dm-ctl")
        self._rr = itertools.count()
        self._state = threading.Lock()
        self._rids: dict[str, set[str]] = {}  # request id -> rids in flight
        self._aborted: set[str] = set()
        self._calls: dict[str, int] = {}  # request id -> generate calls holding it
        self.released: set[str] = set()  # memory tags the servers gave back (colocation)

    @classmethod
    def launch(cls, model_path: str, config, *, host: str = "127.0.0.1", log_dir: str | None = None,
               startup_timeout_s: float = 900.0, **kwargs) -> SGLangEngine:
        """Start ``config.servers_per_node`` servers and a router on this node and connect to them."""
        from delta_megatron.rollout.sglang_server import launch_server_group

        group = launch_server_group(model_path, config, host=host, log_dir=log_dir,
                                    startup_timeout_s=startup_timeout_s)
        return cls(group.router_url, group.worker_urls, config=config, servers=group, **kwargs)

    # ------------------------------------------------------------------ workers (control plane)
    def router_workers(self, timeout: float | None = None, retries: int | None = None) -> list[str]:
        """Worker URLs registered in the router (``GET /workers``; ``/list_workers`` before 0.2).
        ``timeout``: per attempt, default the control timeout; ``retries``: default ``max_retries``."""
        kw = {"timeout": timeout or self.control_timeout_s, "retries": retries}
        try:
            listing = self.http.get(f"{self.router_url}/workers", **kw)
            return [w["url"].rstrip("/") for w in listing["workers"]]
        except RequestFailed as err:
            if getattr(err, "status", None) != 404:
                raise
        listing = self.http.get(f"{self.router_url}/list_workers", **kw)
        return [u.rstrip("/") for u in listing["urls"]]

    def worker_urls(self) -> list[str]:
        return list(self._given_workers) if self._given_workers else self.router_workers()

    def post_each(self, path: str, payloads: list[dict[str, Any]]) -> list[tuple[str, Any]]:
        return self._post(self.worker_urls(), path, payloads)

    def post_all(self, path: str, payload: dict[str, Any]) -> list[tuple[str, Any]]:
        urls = self.worker_urls()
        return self._post(urls, path, [payload] * len(urls))

    def _post(self, urls: list[str], path: str, payloads: list[dict[str, Any]]) -> list[tuple[str, Any]]:
        """POST to every worker concurrently; wait for all (no request left behind), then raise the
        first failure (its message names the URL)."""
        if len(payloads) != len(urls):
            raise ValueError(f"{len(payloads)} payloads for {len(urls)} workers")
        futures = [self._control.submit(self.http.post, f"{u}{path}", p,
                                        timeout=self.control_timeout_s) for u, p in zip(urls, payloads)]
        results, first_err = [], None
        for url, fut in zip(urls, futures):
            try:
                results.append((url, fut.result()))
            except RequestFailed as err:
                first_err = first_err or err
            except Exception as err:
                first_err = first_err or RequestFailed(f"POST {url}{path}: {err!r}")
        if first_err is not None:
            raise first_err
        return results

    # ------------------------------------------------------------------ generation (data plane)
    def generate(self, requests: Sequence[GenerateRequest]) -> list[Sample]:
        requests = list(requests)
        jobs = sample_slots(requests)
        self._enter(requests)
        guard, stop, dead = threading.Lock(), threading.Event(), []
        threading.Thread(target=self._watch_health, args=(requests, guard, stop, dead), daemon=True,
                         name="dm-health").start()
        try:
            futures = [self._pool.submit(self._generate_one, req, idx) for req, idx in jobs]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in done if f.exception() is not None), None)
            if failed is not None:  # stop the rest now, keep the first error
                self._fail_fast(requests)
                wait(pending)
                raise failed.exception()
            if dead:
                raise RolloutError(f"generate: {dead[0]}")
            return [f.result() for f in futures]
        finally:
            with guard:
                stop.set()
            self._exit(requests)

    def _watch_health(self, requests: list[GenerateRequest], guard: threading.Lock, stop: threading.Event,
                      dead: list[str]) -> None:
        """Probe the servers every ``health_interval_s`` while ``generate`` runs; on a dead one, record
        it and cancel the call's requests (``generate`` then raises)."""
        while not stop.wait(self.health_interval_s):
            found = self._dead_server()
            with guard:
                if stop.is_set():
                    return
                if found:
                    dead.append(found)
                    self._fail_fast(requests)
                    return

    def _dead_server(self) -> str | None:
        """What is wrong with the first server (router or worker) that refuses connections, else None.
        A probe that times out proves nothing (busy or frozen: the request deadlines handle those)."""
        urls = [self.router_url] if self.router_url else []
        try:
            urls += list(self._given_workers) if self._given_workers else \
                _probe(lambda: self.router_workers(timeout=self.health_interval_s, retries=0))
        except _Dead as err:
            return str(err)
        except RequestFailed:
            pass
        for url in urls:
            try:
                _probe(lambda u=url: self.http.get(f"{u}/health", retries=0, timeout=self.health_interval_s,
                                                   deadline_s=self.health_interval_s))
            except _Dead as err:
                return str(err)
            except RequestFailed:
                continue
        return None

    def _fail_fast(self, requests: list[GenerateRequest]) -> None:
        """Mark ``requests`` aborted and close their sockets now; tell the servers in the background
        (a frozen server cannot hold the caller)."""
        with self._state:
            ids = {r.request_id for r in requests} & set(self._calls)
            self._aborted |= ids
            rids = [rid for rq in ids for rid in self._rids.get(rq, ())]
        self.http.cancel(list(ids))
        if rids:
            self._background(self._best_effort_abort, rids)

    def _background(self, fn, *args) -> None:
        try:
            self._control.submit(fn, *args)
        except RuntimeError:  # the engine is closed: nothing left to tell
            pass

    def _generate_one(self, req: GenerateRequest, idx: int) -> Sample:
        max_new = room_in_context(req, self.context_len)
        if max_new == 0:
            return self._sample(req, idx, [], [], "length")
        if self._is_aborted(req.request_id):
            return self._sample(req, idx, [], [], "abort")
        sp = {"temperature": float(req.params.temperature), "top_p": float(req.params.top_p),
              "top_k": int(req.params.top_k), "max_new_tokens": max_new,
              "stop_token_ids": list(req.params.stop_token_ids)}
        if req.params.seed is not None:
            sp["sampling_seed"] = req.params.seed + idx
        payload = {"rid": self._new_rid(req, idx), "input_ids": req.prompt_ids + req.response_prefix_ids,
                   "sampling_params": sp, "return_logprob": True}

        def before_retry(attempt: int, err: Exception) -> None:  # abort the stale attempt, new rid
            old = payload["rid"]
            self._background(self._best_effort_abort, [old])  # never delays the retry
            payload["rid"] = self._new_rid(req, idx)
            self._swap_rid(req.request_id, old, payload["rid"])

        self._swap_rid(req.request_id, None, payload["rid"])
        try:
            out = self.http.post(self._generate_url(), payload, cancel_key=req.request_id,
                                 before_retry=before_retry)
        except RequestCancelled:
            return self._sample(req, idx, [], [], "abort")
        except RequestFailed as err:
            if self._is_aborted(req.request_id):
                return self._sample(req, idx, [], [], "abort")
            raise RolloutError(f"generate: sample {req.sample_id(idx)} failed: {err}") from err
        finally:
            self._swap_rid(req.request_id, payload["rid"], None)
        return self._parse(out, req, idx)

    def _generate_url(self) -> str:
        if self.router_url:
            return f"{self.router_url}/generate"
        urls = self._given_workers
        return f"{urls[next(self._rr) % len(urls)]}/generate"

    def _parse(self, out: Any, req: GenerateRequest, idx: int) -> Sample:
        if isinstance(out, list):  # a batch answer; we always send one prompt
            out = out[0]
        try:
            meta = out["meta_info"]
            pairs = meta.get("output_token_logprobs") or []
            tokens = [int(p[1]) for p in pairs]
            logprobs = [float(p[0]) for p in pairs]
            finish = meta.get("finish_reason")
        except (KeyError, TypeError, IndexError, ValueError) as err:
            raise RolloutError(f"generate: malformed SGLang answer for {req.sample_id(idx)}: "
                               f"{str(out)[:300]}") from err
        if out.get("output_ids") and not pairs:
            raise RolloutError(f"generate: {req.sample_id(idx)} came back without "
                               "output_token_logprobs (return_logprob ignored?)")
        kind = finish.get("type") if isinstance(finish, dict) else finish
        reason = kind if kind in ("stop", "length") else "abort"
        return self._sample(req, idx, tokens, logprobs, reason)

    def _sample(self, req: GenerateRequest, idx: int, tokens: list[int], logprobs: list[float],
                reason: str) -> Sample:
        return req.sample(idx, tokens, logprobs, reason, self.weight_version)

    @staticmethod
    def _new_rid(req: GenerateRequest, idx: int) -> str:
        return f"{req.sample_id(idx)}-{uuid.uuid4().hex[:8]}"

    # ------------------------------------------------------------------ abort
    def _enter(self, requests: list[GenerateRequest]) -> None:
        with self._state:
            for r in requests:
                self._calls[r.request_id] = self._calls.get(r.request_id, 0) + 1

    def _exit(self, requests: list[GenerateRequest]) -> None:
        finished = []
        with self._state:
            for r in requests:
                self._calls[r.request_id] -= 1
                if not self._calls[r.request_id]:
                    del self._calls[r.request_id]
                    self._aborted.discard(r.request_id)
                    finished.append(r.request_id)
        self.http.forget(finished)

    def _swap_rid(self, request_id: str, old: str | None, new: str | None) -> None:
        with self._state:
            rids = self._rids.setdefault(request_id, set())
            rids.discard(old)
            if new is not None:
                rids.add(new)
            if not rids:
                del self._rids[request_id]

    def _is_aborted(self, request_id: str) -> bool:
        with self._state:
            return request_id in self._aborted

    def abort(self, request_ids: Iterable[str] | None = None) -> None:
        """Abort in-flight requests on every server; queued samples of them are not sent."""
        with self._state:
            ids = set(self._calls) if request_ids is None else set(request_ids) & set(self._calls)
            self._aborted |= ids
            rids = [rid for rq in ids for rid in self._rids.get(rq, ())]
        if request_ids is None:
            self._best_effort_abort(None)
        elif rids:
            self._best_effort_abort(rids)

    def _best_effort_abort(self, rids: list[str] | None) -> None:
        """``/abort_request`` on every server (one attempt within the control timeout); if a server
        cannot be reached, cancel client-side."""
        payloads = [{"abort_all": True}] if rids is None else [{"rid": r} for r in rids]
        try:
            for payload in payloads:
                for url in self.worker_urls():
                    self.http.post(f"{url}/abort_request", payload, retries=0,
                                   timeout=self.control_timeout_s)
        except RequestFailed:
            with self._state:
                keys = list(self._aborted)
            self.http.cancel(keys)

    # ------------------------------------------------------------------ pause / weights
    def pause(self) -> None:
        """Pause every server; if one fails, resume the others before raising (none stays paused)."""
        try:
            self.post_all("/pause_generation", {"mode": self.pause_mode})
        except Exception as err:
            try:
                self.resume()
            except Exception as resume_err:
                raise RolloutError(f"pause failed ({err}) and so did resuming: {resume_err}") from err
            raise

    def resume(self) -> None:
        self.post_all("/continue_generation", {})

    def release_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        """Every server frees ``tags`` (``ReleaseMemoryOccupationReqInput.tags``); idle servers only."""
        tags = check_memory_tags(tags, "release_memory_occupation")
        self.post_all("/release_memory_occupation", {"tags": list(tags)})
        self.released |= set(tags)

    def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        """Every server maps ``tags`` again (``None``: all it released)."""
        payload = {"tags": None if tags is None else list(check_memory_tags(tags, "resume_memory_occupation"))}
        self.post_all("/resume_memory_occupation", payload)
        self.released -= set(payload["tags"] or self.released)

    def flush_cache(self) -> None:
        if self.pause_mode != "in_place":  # SGLang refuses to flush with requests parked in place
            self.post_all("/flush_cache", {})

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push HF-named tensors with the configured strategy inside pause/flush/resume."""
        probe: dict[str, torch.Tensor] = {}
        stream = (self._probe(named_tensors, probe) if self.check_weights_after_sync
                  else named_tensors)
        version = self.weight_version + 1
        with weight_update_window(self, f"weight sync ({self.weight_sync.name}) to "
                                        f"{', '.join(self.worker_urls())}"):
            self.weight_sync.push(self, stream, version)
            self.flush_cache()
        self.weight_version = version
        if probe:
            self.check_weights(probe.items())

    def push_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                     version: int | None = None) -> int:
        """Push without a pause window: a pipeline stage's sender while another rank holds the
        window (``weight_update_window(engine)`` around all stages' pushes). With
        ``check_weights`` the pushed tensors are then compared with the servers'. Returns bytes sent."""
        probe: dict[str, torch.Tensor] = {}
        stream = self._probe(named_tensors, probe) if self.check_weights_after_sync else named_tensors
        sent = self.weight_sync.push(self, stream, version or self.weight_version + 1)
        if probe:
            self.check_weights(probe.items())
        return sent

    def probe_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """The rows of ``tensor`` that ``check_weights`` compares (a copy)."""
        return tensor.detach()[: self.check_truncate].float().cpu().clone()

    def _probe(self, named_tensors, probe: dict[str, torch.Tensor]) -> Iterator:
        for name, tensor in named_tensors:  # keep the rows check_weights reads, not whole tensors
            probe[name] = self.probe_rows(tensor)
            yield name, tensor

    def update_weights_from_disk(self, path: str | Path) -> None:
        version = self.weight_version + 1
        with weight_update_window(self, f"weight load from {path}"):
            load_from_disk(self, path, version)
            self.flush_cache()
        self.weight_version = version

    def weight_diffs(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, float]:
        """Max |server - trainer| over the first ``check_truncate`` rows, per (worker, name);
        ``inf`` where a server cannot return the weight or the shapes differ."""
        diffs = {}
        for name, tensor in named_tensors:
            expected = tensor.detach()[: self.check_truncate].float().cpu()
            payload = {"name": name, "truncate_size": self.check_truncate}
            for url in self.worker_urls():
                key = f"{url} {name}"
                try:
                    got = torch.tensor(self.http.post(f"{url}/get_weights_by_name", payload,
                                                      timeout=self.control_timeout_s))
                except (RequestFailed, TypeError, ValueError):
                    diffs[key] = float("inf")
                    continue
                diffs[key] = (float((got - expected).abs().max()) if got.shape == expected.shape
                              else float("inf"))
        return diffs

    def check_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Raise :class:`WeightSyncError` naming every weight whose server copy differs."""
        diffs = self.weight_diffs(named_tensors)
        bad = {k: v for k, v in diffs.items() if not v <= self.check_atol}
        if bad:
            shown = ", ".join(f"{k} (max diff {v:.3g})" for k, v in list(bad.items())[:8])
            raise WeightSyncError(f"check_weights: {len(bad)} of {len(diffs)} weights differ from "
                                  f"the trainer's: {shown}")

    # ------------------------------------------------------------------ health / close
    def health(self) -> bool:
        urls = ([self.router_url] if self.router_url else []) + (self._given_workers or [])
        try:
            for url in urls:
                self.http.get(f"{url}/health", retries=0, timeout=self.health_interval_s)
            return True
        except Exception:
            return False

    def close(self) -> None:
        try:
            self.weight_sync.close(self)  # e.g. destroy the NCCL group on the servers
        except Exception:  # servers already gone: nothing left to release there
            pass
        finally:
            self.http.close()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._control.shutdown(wait=False, cancel_futures=True)
            if self.servers is not None:
                self.servers.close()
