"""The RolloutEngine contract (ARCHITECTURE.md, contract 4) and the records that cross it.

Two engines implement it: :class:`~delta_megatron.rollout.embedded.EmbeddedEngine` (an HF model
in-process, the CPU default) and :class:`~delta_megatron.rollout.sglang_engine.SGLangEngine` (SGLang
servers behind ``sglang_router``). The trainer only sees this module, so a run can switch engines by
config without touching the loop.

Conventions shared by every engine:

* ``Sample.logprobs[t]`` is ``log_softmax(logits_t / T)[y_t]`` — temperature applied, *before* top-k /
  top-p truncation (SGLang's default, ``SGLANG_RETURN_ORIGINAL_LOGPROB`` unset). For greedy requests
  (``temperature == 0``) it is ``log_softmax(logits_t)[y_t]``.
* A response keeps its stop token (EOS or a ``stop_token_ids`` entry) as its last token.
* Weight names crossing the boundary are HF names from the project's single converter.
* Samples aborted mid-generation keep their partial tokens (``finish_reason == "abort"``) so a
  :class:`PartialRolloutBuffer` can continue them after a weight update (partial rollouts).
* Colocated with the actor, an engine gives its device memory back between rollouts, by SGLang's
  tags (:data:`MEMORY_TAGS`): ``release_memory_occupation(["kv_cache", "weights"])`` after a rollout;
  ``resume_memory_occupation(["weights"])``, a weight update, then ``resume_memory_occupation(
  ["kv_cache"])`` before the next one (slime's order: the KV pool is mapped only once the weights are
  in). Released weights are discarded: until the next update the engine refuses to generate.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from delta_megatron.rollout.config import RolloutConfig

__all__ = [
    "FinishReason", "SamplingParams", "GenerateRequest", "Sample", "RolloutEngine",
    "RolloutError", "RequestFailed", "WeightSyncError", "PartialRolloutBuffer", "weight_update_window",
    "sample_slots", "room_in_context", "MEMORY_TAGS", "check_memory_tags",
]

FinishReason = Literal["stop", "length", "abort"]

#: SGLang's memory regions (``io_struct.ReleaseMemoryOccupationReqInput.tags``; ``None`` = both)
MEMORY_TAGS = ("kv_cache", "weights")


class RolloutError(RuntimeError):
    """A rollout engine could not do what was asked; the message says which call, where and why."""


class RequestFailed(RolloutError):
    """An HTTP request to a server or router failed after its retries."""


class WeightSyncError(RolloutError):
    """A weight update (or the check after it) failed; the engine has been resumed."""


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. ``top_k = -1`` and ``top_p = 1`` disable truncation; ``temperature = 0``
    is greedy. ``stop_token_ids`` are *added* to the model's EOS (as in SGLang). ``seed`` makes an
    engine's samples reproducible and independent of the global RNG."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 32
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature: {self.temperature} — must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p: {self.top_p} — must be in (0, 1]")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"SamplingParams.top_k: {self.top_k} — must be -1 (off) or >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens: {self.max_new_tokens} — must be >= 1")
        if self.n < 1:
            raise ValueError(f"SamplingParams.n: {self.n} — must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_config(cls, cfg: RolloutConfig, **overrides) -> SamplingParams:
        """Sampling of a training rollout (``rollout.*``); ``overrides`` e.g. eval temperature."""
        base = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                    max_new_tokens=cfg.max_new_tokens, n=cfg.n_samples)
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)


@dataclass
class GenerateRequest:
    """One prompt to sample ``params.n`` responses for.

    ``response_prefix_ids`` / ``response_prefix_logprobs`` continue a partial (aborted) sample: the
    engine conditions on ``prompt_ids + response_prefix_ids``, generates at most
    ``max_new_tokens - len(prefix)`` more tokens and returns the prefix and the continuation as one
    response. ``first_index`` numbers the samples ``first_index .. first_index + n - 1`` so a
    continued sample keeps its original index.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    group_id: int | str | None = None
    response_prefix_ids: list[int] = field(default_factory=list)
    response_prefix_logprobs: list[float] = field(default_factory=list)
    first_index: int = 0

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError(f"GenerateRequest {self.request_id!r}: empty prompt_ids")
        if len(self.response_prefix_ids) != len(self.response_prefix_logprobs):
            raise ValueError(f"GenerateRequest {self.request_id!r}: response prefix has "
                             f"{len(self.response_prefix_ids)} tokens but "
                             f"{len(self.response_prefix_logprobs)} log-probs")
        if self.response_prefix_ids and self.params.n != 1:
            raise ValueError(f"GenerateRequest {self.request_id!r}: a continuation must have n == 1")

    @property
    def remaining_tokens(self) -> int:
        """Tokens still allowed after the prefix (0: the sample is already at its length limit)."""
        return max(self.params.max_new_tokens - len(self.response_prefix_ids), 0)

    def sample_id(self, index: int) -> str:
        return f"{self.request_id}-{index}"

    def sample(self, index: int, tokens: list[int], logprobs: list[float], finish_reason: FinishReason,
               weight_version: int) -> Sample:
        """Response ``index`` of this request: newly generated ``tokens`` after the carried-over prefix."""
        return Sample(request_id=self.request_id, index=index, prompt_ids=list(self.prompt_ids),
                      response_ids=list(self.response_prefix_ids) + tokens,
                      logprobs=list(self.response_prefix_logprobs) + logprobs, finish_reason=finish_reason,
                      group_id=self.group_id, weight_version=weight_version,
                      prefix_len=len(self.response_prefix_ids))


@dataclass
class Sample:
    """One response. ``prefix_len`` counts leading response tokens carried over from an earlier,
    aborted generation (sampled by older weights — losses may want to mask them)."""

    request_id: str
    index: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # [len(response_ids)] rollout log-probs, see module docstring
    finish_reason: FinishReason
    group_id: int | str | None = None
    weight_version: int = 0
    prefix_len: int = 0

    @property
    def sample_id(self) -> str:
        return f"{self.request_id}-{self.index}"

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"

    def continuation(self, params: SamplingParams) -> GenerateRequest:
        """The request that continues this (aborted) sample under ``params`` (``n`` forced to 1)."""
        return GenerateRequest(
            request_id=self.request_id, prompt_ids=list(self.prompt_ids),
            params=params.replace(n=1), group_id=self.group_id,
            response_prefix_ids=list(self.response_ids),
            response_prefix_logprobs=list(self.logprobs), first_index=self.index)


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a rollout engine (ARCHITECTURE.md, contract 4)."""

    weight_version: int

    def generate(self, requests: Sequence[GenerateRequest]) -> list[Sample]:
        """``params.n`` samples per request, in request order then sample index."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load HF-named tensors (a stream: each tensor is read once)."""

    def update_weights_from_disk(self, path: str | Path) -> None:
        """Load an HF checkpoint directory (safetensors) written by the exporter."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def health(self) -> bool:
        """True when the engine can serve; never raises."""

    def abort(self, request_ids: Iterable[str] | None = None) -> None:
        """Abort in-flight requests (all when ``None``); their samples come back with
        ``finish_reason == "abort"`` and the tokens generated so far."""

    def release_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        """Free the device memory of ``tags`` (:data:`MEMORY_TAGS`; ``None`` = all); the engine must
        be idle. Released weights are gone: resume them and update the weights before generating."""

    def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        """Map the memory of released ``tags`` again (``None`` = all released)."""

    def close(self) -> None: ...


def room_in_context(req: GenerateRequest, context_len: int | None) -> int:
    """Tokens ``req`` may still generate: its budget, cut so prompt + response never exceed the
    model's context (``max_position_embeddings``); a prompt that fills the context is an error."""
    if context_len is None:
        return req.remaining_tokens
    used = len(req.prompt_ids) + len(req.response_prefix_ids)
    if req.remaining_tokens and used >= context_len:
        raise RolloutError(f"generate: request {req.request_id!r} has {used} prompt tokens, which leaves no "
                           f"room in the model's context of {context_len} (max_position_embeddings); "
                           "rollout.max_prompt_len keeps such prompts out")
    return min(req.remaining_tokens, context_len - used)
def check_memory_tags(tags: Sequence[str] | None, where: str) -> tuple[str, ...]:
    """``tags`` as a tuple (``None`` = every tag); raises ``ValueError`` naming unknown ones."""
    if tags is None:
        return MEMORY_TAGS
    unknown = [t for t in tags if t not in MEMORY_TAGS]
    if unknown:
        raise ValueError(f"{where}: unknown memory tags {unknown}; SGLang knows {', '.join(MEMORY_TAGS)}")
    return tuple(tags)


def sample_slots(requests: Sequence[GenerateRequest]) -> list[tuple[GenerateRequest, int]]:
    """(request, sample index) for every sample asked for, in output order; rejects duplicates
    (two samples with one ``sample_id`` could not be told apart downstream)."""
    slots = [(req, req.first_index + j) for req in requests for j in range(req.params.n)]
    ids = [req.sample_id(idx) for req, idx in slots]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"generate: sample id {dup!r} requested twice (request ids must be unique)")
    return slots


@contextlib.contextmanager
def weight_update_window(engine: RolloutEngine, what: str = "weight update") -> Iterator[None]:
    """Pause ``engine`` for a weight update and resume it whatever happens.

    An exception inside the window is re-raised as :class:`WeightSyncError` naming ``what``; a failing
    resume after a successful update is raised too (an engine must never stay paused silently).
    """
    engine.pause()
    try:
        yield
    except BaseException as err:
        try:
            engine.resume()
        except Exception as resume_err:  # keep the original error, say resume failed as well
            if hasattr(err, "add_note"):  # Python >= 3.11
                err.add_note(f"resuming the engine after the failed {what} also failed: {resume_err!r}")
        if isinstance(err, WeightSyncError) or not isinstance(err, Exception):
            raise
        raise WeightSyncError(f"{what} failed: {err}") from err
    engine.resume()


class PartialRolloutBuffer:
    """Aborted samples waiting to be continued (partial-rollout recycling, as slime/AReaL do).

    ``split`` keeps the aborted samples of a generate call and returns the finished ones; after the
    weight update, ``continuations`` turns the kept samples into requests that resume from their
    partial tokens (samples already at their length limit come back finished as ``"length"``).
    """

    def __init__(self) -> None:
        self._samples: dict[str, Sample] = {}

    def __len__(self) -> int:
        return len(self._samples)

    def split(self, samples: Iterable[Sample]) -> list[Sample]:
        done = []
        for s in samples:
            if s.finish_reason == "abort":
                self._samples[s.sample_id] = s
            else:
                done.append(s)
        return done

    def continuations(self, params: SamplingParams) -> tuple[list[GenerateRequest], list[Sample]]:
        """(requests to continue, samples that need no more tokens). Empties the buffer."""
        requests, finished = [], []
        for s in self._samples.values():
            req = s.continuation(params)
            if req.remaining_tokens == 0:
                finished.append(dataclasses.replace(s, finish_reason="length"))
            else:
                requests.append(req)
        self._samples.clear()
        return requests, finished
