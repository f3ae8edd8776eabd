"""The embedded rollout engine: an HF causal LM generating in-process (CPU default, also GPU).

Generation is ``model.generate`` (KV cache, left padding, EOS handling) with three additions passed
through its public hooks rather than a hand-written decode loop:

* a first logits processor that records ``log_softmax(logits / T)`` of the *raw* logits and reads the
  sampled token back at the next step — the rollout log-prob — holding one ``[batch, vocab]`` step in
  memory instead of ``output_logits``' ``[batch, steps, vocab]``;
* transformers' own Temperature / Top-k / Top-p warpers placed *after* that recorder (``generate``
  runs greedy, so none of its built-in warpers runs before it), then a sampler that draws each row's
  token with the row's own ``torch.Generator`` and masks the rest, which greedy selection emits;
* a stopping criterion that ends the rows of aborted requests, keeping their partial tokens.

Colocation: ``release_memory_occupation`` frees the parameters' storage (``weights``: discarded, as
SGLang does) and blocks generation until ``kv_cache`` is resumed (HF allocates its KV cache per
``generate`` call, so that tag holds no memory between rollouts); after ``resume_memory_occupation(
["weights"])`` every weight must be updated before the engine generates again. CPU runs thus make the
same calls in the same order as a colocated SGLang engine.

Sample j of a request is thus a function of (request seed, j) — independent of the other requests
in its batch, of ``batch_size``, and of the global RNG, which is never touched. Requests that differ
only in their seed (one seed per prompt group, as the trainer sends) share micro-batches.
"""

from __future__ import annotations

import contextlib
import difflib
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from delta_megatron.rollout.engine import (
    GenerateRequest,
    RolloutError,
    Sample,
    SamplingParams,
    WeightSyncError,
    check_memory_tags,
    room_in_context,
    sample_slots,
)

__all__ = ["EmbeddedEngine"]

_SEED_MOD = 2**62


def left_padded(inputs: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention mask) of a decode batch, left-padded: each row's last token at column -1."""
    width = max(len(x) for x in inputs)
    input_ids = torch.full((len(inputs), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(inputs), width), dtype=torch.long)
    for i, ids in enumerate(inputs):
        input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention[i, width - len(ids):] = 1
    return input_ids, attention


class _LogprobRecorder:
    """Logits processor (first in the list) that collects log p(y_t) of each sampled token."""

    def __init__(self, temperature: float):
        self.temperature = temperature if temperature > 0 else 1.0
        self.prev: torch.Tensor | None = None  # [B, V] fp32 log-softmax of the previous step
        self.cols: list[torch.Tensor] = []  # each [B]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:  # input_ids[:, -1] is the token sampled from self.prev
            self.cols.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """[B, S] log-probs of ``new_tokens`` (the generated part of the sequences)."""
        steps = new_tokens.shape[1]
        if len(self.cols) < steps and self.prev is not None:
            self.cols.append(self.prev.gather(1, new_tokens[:, len(self.cols):len(self.cols) + 1])
                             .squeeze(1))
        if not self.cols:
            return new_tokens.new_zeros(new_tokens.shape, dtype=torch.float32)
        return torch.stack(self.cols[:steps], dim=1)


class _SeededSampler:
    """Last logits processor: draws each row's token from ``softmax(processed scores)`` with that
    row's own generator and leaves only that token finite, so ``generate`` (run greedy) emits it.

    Per-row generators make sample j of a request a function of (request seed, j) alone — not of
    the batch it shares, ``batch_size`` or the global RNG (which is never touched)."""

    def __init__(self, seeds: list[int], device: torch.device):
        self.gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float(), dim=-1)  # [B, V]
        picks = torch.stack([torch.multinomial(probs[i], 1, generator=g)
                             for i, g in enumerate(self.gens)])  # [B, 1]
        return torch.full_like(scores, float("-inf")).scatter_(1, picks, 0.0)


class _AbortCriterion:
    """Stopping criterion: rows whose request was aborted stop; remembers how many tokens they had."""

    def __init__(self, engine: EmbeddedEngine, request_ids: list[str], prompt_len: int):
        self.engine, self.request_ids, self.prompt_len = engine, request_ids, prompt_len
        self.abort_len: list[int | None] = [None] * len(request_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        aborted = self.engine._aborted_now()
        stop = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i, rid in enumerate(self.request_ids):
            if rid in aborted:
                if self.abort_len[i] is None:
                    self.abort_len[i] = input_ids.shape[1] - self.prompt_len
                stop[i] = True
        return stop


class EmbeddedEngine:
    """A :class:`~delta_megatron.rollout.engine.RolloutEngine` around an HF ``PreTrainedModel``.

    ``batch_size`` bounds the sequences generated together (memory); requests with equal sampling
    params (and equal remaining length) share micro-batches. ``update_weights`` copies HF-named
    tensors into the existing parameters (strict names and shapes; tied embeddings accept either
    name). Extra keyword arguments are accepted and ignored so engines share one constructor call.
    """

    def __init__(self, model: torch.nn.Module, pad_token_id: int,
                 eos_token_id: int | Sequence[int] | None = None, *, batch_size: int = 512,
                 seed: int = 0, config=None, **_ignored):
        if config is not None:  # a RolloutConfig
            batch_size = config.batch_size
        if batch_size < 1:
            raise ValueError(f"batch_size: {batch_size} — must be >= 1")
        self.model = model.eval()
        self.pad_token_id = int(pad_token_id)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
        eos = [] if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        self.eos_token_ids = tuple(int(t) for t in eos)
        self.batch_size = int(batch_size)
        # generation stops at the model's context: a sample is cut ("length") rather than run past it
        self.context_len: int | None = getattr(model.config, "max_position_embeddings", None)
        self.weight_version = 0
        self._seed_gen = torch.Generator().manual_seed(seed)  # seeds for unseeded requests
        self._lock = threading.RLock()  # one micro-batch or weight update at a time
        self._state = threading.Lock()  # guards the in-flight / aborted sets
        self._inflight: dict[str, int] = {}
        self._aborted: set[str] = set()
        self._running = threading.Event()
        self._running.set()
        self._closed = False
        self.released: set[str] = set()  # memory tags given back (colocation)
        self._freed: list[tuple[torch.UntypedStorage, int]] = []  # released weight storages
        self._awaiting: set[str] = set()  # weights resumed but not updated yet

    # ------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[GenerateRequest]) -> list[Sample]:
        if self._closed:
            raise RolloutError("EmbeddedEngine.generate: the engine is closed")
        if self.released or self._awaiting:
            raise RolloutError(
                "EmbeddedEngine.generate: " + (f"memory released ({', '.join(sorted(self.released))})"
                                               if self.released else
                                               f"{len(self._awaiting)} weights not updated since resume")
                + "; resume weights, update them, then resume kv_cache")
        requests = list(requests)
        rows = sample_slots(requests)
        out: dict[tuple[str, int], Sample] = {}
        groups: dict[tuple, list[tuple[GenerateRequest, int]]] = {}
        seeds: dict[str, int] = {}
        with self._lock:  # unseeded requests draw from the engine's own generator, in order
            for req in requests:
                seeds[req.request_id] = req.params.seed if req.params.seed is not None else int(
                    torch.randint(_SEED_MOD, (1,), generator=self._seed_gen))
        for req, idx in rows:
            remaining = room_in_context(req, self.context_len)
            if remaining == 0:
                out[(req.request_id, idx)] = self._sample(req, idx, [], [], "length")
            else:  # requests that differ only in seed share micro-batches
                key = (req.params.replace(n=1, seed=None), remaining)
                groups.setdefault(key, []).append((req, idx))
        with self._track(requests):
            for (params, remaining), group in groups.items():
                for start in range(0, len(group), self.batch_size):
                    chunk = group[start:start + self.batch_size]
                    self._running.wait()  # paused: wait for resume before starting new work
                    aborted = self._aborted_now()
                    pending = [(r, i) for r, i in chunk if r.request_id not in aborted]
                    for r, i in chunk:
                        if r.request_id in aborted:
                            out[(r.request_id, i)] = self._sample(r, i, [], [], "abort")
                    if pending:
                        row_seeds = [(seeds[r.request_id] * 1_000_003 + i) % _SEED_MOD
                                     for r, i in pending]
                        with self._lock:
                            out.update(self._generate_chunk(pending, params, remaining, row_seeds))
        return [out[(req.request_id, idx)] for req, idx in rows]

    def _generate_chunk(self, chunk: list[tuple[GenerateRequest, int]], params: SamplingParams,
                        max_new: int, row_seeds: list[int]) -> dict[tuple[str, int], Sample]:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        device = next(self.model.parameters()).device
        input_ids, attention = left_padded([r.prompt_ids + r.response_prefix_ids for r, _ in chunk],
                                           self.pad_token_id)
        width = input_ids.shape[1]
        stop_ids = sorted(set(self.eos_token_ids) | set(params.stop_token_ids))
        recorder = _LogprobRecorder(params.temperature)
        processors = [recorder]
        if not params.greedy:
            if params.temperature != 1.0:
                processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
            processors.append(_SeededSampler(row_seeds, device))
        criterion = _AbortCriterion(self, [r.request_id for r, _ in chunk], width)
        gen_cfg = GenerationConfig(  # greedy: sampling happens in _SeededSampler
            do_sample=False, max_new_tokens=max_new, eos_token_id=stop_ids or None,
            pad_token_id=self.pad_token_id, return_dict_in_generate=True)
        result = self.model.generate(
            input_ids=input_ids.to(device), attention_mask=attention.to(device),
            generation_config=gen_cfg, logits_processor=LogitsProcessorList(processors),
            stopping_criteria=StoppingCriteriaList([criterion]))
        new_tokens = result.sequences[:, width:]  # [B, S]
        logprobs = recorder.finish(new_tokens).cpu()  # [B, S]
        new_tokens = new_tokens.cpu()
        stop_set = set(stop_ids)
        out = {}
        for i, (req, idx) in enumerate(chunk):
            toks = new_tokens[i].tolist()
            end, reason = len(toks), "length"
            for k, tok in enumerate(toks):
                if tok in stop_set:
                    end, reason = k + 1, "stop"
                    break
            cut = criterion.abort_len[i]
            if cut is not None and (reason == "length" or cut < end):
                end, reason = cut, "abort"
            if reason == "length" and end != max_new:
                raise RolloutError(f"EmbeddedEngine: sample {req.sample_id(idx)} ended after {end} of "
                                   f"{max_new} tokens without a stop token (generate stopped early)")
            out[(req.request_id, idx)] = self._sample(req, idx, toks[:end],
                                                      logprobs[i, :end].tolist(), reason)
        return out

    def _sample(self, req: GenerateRequest, idx: int, tokens: list[int], logprobs: list[float],
                reason: str) -> Sample:
        return req.sample(idx, tokens, logprobs, reason, self.weight_version)

    # ------------------------------------------------------------------ abort / pause
    @contextlib.contextmanager
    def _track(self, requests: list[GenerateRequest]):
        ids = [r.request_id for r in requests]
        with self._state:
            for rid in ids:
                self._inflight[rid] = self._inflight.get(rid, 0) + 1
        try:
            yield
        finally:
            with self._state:
                for rid in ids:
                    self._inflight[rid] -= 1
                    if not self._inflight[rid]:
                        del self._inflight[rid]
                        self._aborted.discard(rid)

    def _aborted_now(self) -> set[str]:
        with self._state:
            return set(self._aborted)

    def abort(self, request_ids: Iterable[str] | None = None) -> None:
        """Abort in-flight requests (all when ``None``); ids not in flight are ignored."""
        with self._state:
            wanted = set(self._inflight) if request_ids is None else set(request_ids)
            self._aborted |= wanted & set(self._inflight)

    def pause(self) -> None:
        """Stop starting new micro-batches (the one running finishes) until :meth:`resume`."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def health(self) -> bool:
        return not self._closed

    def close(self) -> None:
        self._closed = True
        self._running.set()

    # ------------------------------------------------------------------ colocation (memory tags)
    def _param_storages(self) -> list[torch.UntypedStorage]:
        seen, out = set(), []
        for p in self.model.parameters():
            st = p.untyped_storage()
            if st.data_ptr() not in seen and st.nbytes():
                seen.add(st.data_ptr())
                out.append(st)
        return out

    def release_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        """Give back ``tags`` (``weights``: parameter storage freed, contents discarded)."""
        tags = check_memory_tags(tags, "EmbeddedEngine.release_memory_occupation")
        with self._lock, self._state:
            if self._inflight:
                raise RolloutError("release_memory_occupation: the engine is generating "
                                   f"({len(self._inflight)} requests in flight)")
            twice = sorted(set(tags) & self.released)
            if twice:
                raise RolloutError(f"release_memory_occupation: {twice} already released")
            if "weights" in tags:
                self._freed = [(st, st.nbytes()) for st in self._param_storages()]
                for st, _ in self._freed:
                    st.resize_(0)
            self.released |= set(tags)

    def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        """Map released ``tags`` again; resumed weights are zeros until every one is updated."""
        tags = check_memory_tags(tags, "EmbeddedEngine.resume_memory_occupation") if tags is not None \
            else tuple(sorted(self.released))
        with self._lock:
            missing = sorted(set(tags) - self.released)
            if missing:
                raise RolloutError(f"resume_memory_occupation: {missing} not released")
            if "weights" in tags:
                for st, nbytes in self._freed:
                    st.resize_(nbytes)
                    torch.empty(0, dtype=torch.uint8, device=st.device).set_(st, 0, (nbytes,)).zero_()
                self._freed = []
                self._awaiting = {n for n, _ in self.model.named_parameters()}
            self.released -= set(tags)

    def resident_bytes(self) -> dict[str, int]:
        """Device bytes held between rollouts: the weights (the KV cache lives inside ``generate``)."""
        return {"weights": sum(st.nbytes() for st in self._param_storages()), "kv_cache": 0}

    # ------------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *,
                       allow_partial: bool = False) -> int:
        """Copy HF-named tensors into the model's parameters; returns how many were copied.

        Names and shapes are checked per tensor (an unknown name or wrong shape raises
        :class:`WeightSyncError` before that tensor is copied); after the stream, parameters that
        received nothing raise unless ``allow_partial`` (a server receiving buckets). Tensors copied
        before an error stay copied: discard the engine's weights or update again.
        """
        with self._lock:
            if "weights" in self.released:
                raise WeightSyncError("update_weights: the weights are released; "
                                      "resume_memory_occupation(['weights']) first")
            targets = self.model.state_dict(keep_vars=True)  # includes tied aliases
            names_of: dict[int, list[str]] = {}
            for name, t in targets.items():
                names_of.setdefault(id(t), []).append(name)
            seen: dict[int, str] = {}
            count = 0
            with torch.no_grad():
                for name, tensor in named_tensors:
                    dst = targets.get(name)
                    if dst is None:
                        close = difflib.get_close_matches(name, list(targets), n=3)
                        raise WeightSyncError(
                            f"update_weights: unknown weight name {name!r}"
                            + (f" (closest: {', '.join(close)})" if close else "")
                            + f"; {count} tensors were already copied")
                    if tuple(dst.shape) != tuple(tensor.shape):
                        raise WeightSyncError(
                            f"update_weights: {name!r} has shape {tuple(tensor.shape)}, the model "
                            f"expects {tuple(dst.shape)}; {count} tensors were already copied")
                    key = id(dst)
                    if key in seen and seen[key] != name and not torch.equal(
                            dst, tensor.to(device=dst.device, dtype=dst.dtype)):
                        raise WeightSyncError(
                            f"update_weights: tied weights {seen[key]!r} and {name!r} received "
                            "different values")
                    dst.copy_(tensor)
                    seen[key] = name
                    count += 1
            received = {n for key in seen for n in names_of[key]}
            self._awaiting -= received
            missing = [names[0] for key, names in names_of.items() if key not in seen]
            if missing and not allow_partial:
                raise WeightSyncError(
                    f"update_weights: {len(missing)} weights received nothing, e.g. "
                    f"{', '.join(missing[:5])}; the model is partially updated")
            self.weight_version += 1
            return count

    def update_weights_from_disk(self, path: str | Path, *, allow_partial: bool = False) -> int:
        """Load every ``*.safetensors`` file of an HF checkpoint directory (or one file)."""
        from delta_megatron.rollout.weight_sync import iter_safetensors

        return self.update_weights(iter_safetensors(path), allow_partial=allow_partial)

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """The model's weights under their HF names (tied aliases once), for checks and tests."""
        return self.model.state_dict().items()
