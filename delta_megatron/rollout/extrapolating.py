"""Two models decoding together: the base model samples, the RL model is asked at every step, and the
positions that §9.3's rule selects are resampled from the extrapolated mix (baselines.md §9.3).

``generate`` cannot drive two models in lock step, so this is a decode loop of its own: each model
keeps its own KV cache over one left-padded micro-batch (prefill, then one token a step), and
:func:`~delta_megatron.rollout.extrapolation.extrapolation_step` turns the two next-token logits into
the emitted tokens. Every row draws its three uniforms per step from its own ``torch.Generator``
seeded by (request seed, request id, sample index): sample j of a request does not depend on its
batch mates, ``batch_size`` or the global RNG. The request id is part of the seed because callers
give every prompt of a call one seed (``requests_for``); without it all prompts would share their
uniforms, and a ``random`` selection would pick the same positions in every response.

It serves evaluation and analysis (``delta-megatron eval --rl``, ``delta-megatron analyze dlogp``),
not training: weight updates are refused.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from delta_megatron.rollout.embedded import left_padded
from delta_megatron.rollout.engine import (
    GenerateRequest,
    RolloutError,
    Sample,
    SamplingParams,
    room_in_context,
    sample_slots,
)
from delta_megatron.rollout.extrapolation import ExtrapolationConfig, extrapolation_step
from delta_megatron.utils.configs import validate

__all__ = ["ExtrapolatingEngine", "DecodeStats", "check_same_vocab", "row_seed", "vocab_size"]

_SEED_MOD = 2**62


def row_seed(seed: int, request_id: str, index: int) -> int:
    """The generator seed of sample ``index`` of request ``request_id`` under request seed ``seed``."""
    digest = hashlib.sha256(f"{seed}/{request_id}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % _SEED_MOD


def vocab_size(model: torch.nn.Module) -> int:
    """Rows of the model's output layer (the logits' width)."""
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


def check_same_vocab(base: torch.nn.Module, rl: torch.nn.Module, base_name: str = "base",
                     rl_name: str = "rl") -> int:
    """The shared vocabulary size; a clear error when the two models' logits do not line up."""
    vb, vr = vocab_size(base), vocab_size(rl)
    if vb != vr:
        raise ValueError(f"{rl_name}: the RL model has a {vr}-token vocabulary, the base model ({base_name}) "
                         f"{vb}: extrapolation compares log-probs token by token, so both must share one "
                         "tokenizer")
    return vb


@dataclass
class DecodeStats:
    """Token counters over generate calls: ``selected`` positions were resampled (Δ <= τ for §9.3),
    ``changed`` of them emitted a token other than the base model's sample."""

    tokens: int = 0
    selected: int = 0
    changed: int = 0

    @property
    def selected_frac(self) -> float:
        return self.selected / self.tokens if self.tokens else 0.0

    @property
    def changed_frac(self) -> float:
        return self.changed / self.tokens if self.tokens else 0.0


class _CachedLM:
    """One model's incremental forward over a left-padded batch with its own KV cache."""

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, attention: torch.Tensor):
        from transformers import DynamicCache

        self.model = model
        self.attention = attention
        self.positions = (attention.cumsum(-1) - 1).clamp(min=0)
        self.cache = DynamicCache(config=model.config)
        # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name still warns)
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.logits = self._forward(input_ids)

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=self.attention, position_ids=self.positions,
                         use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache})
        cache = getattr(out, self.cache_arg, None)
        if cache is not None:
            self.cache = cache
        return out.logits[:, -1].float()

    def advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; returns the next-token logits [B, V]."""
        self.attention = torch.cat([self.attention, self.attention.new_ones(len(tokens), 1)], dim=1)
        self.positions = self.positions[:, -1:] + 1
        self.logits = self._forward(tokens[:, None])
        return self.logits


class ExtrapolatingEngine:
    """A :class:`~delta_megatron.rollout.engine.RolloutEngine` for evaluation: base model ``base``
    samples, ``rl`` supplies the RL log-probs, ``config`` says where and how to resample (§9.3).

    Per request, ``params.temperature`` and ``params.top_p`` replace ``config``'s (so the evaluator's
    sampling settings apply); ``params.top_k`` must be off (the candidates are ``num_logprobs``).
    ``Sample.logprobs`` are the base model's ``log_softmax(logits / T)`` of the emitted tokens.
    ``stats`` counts tokens and resampled positions over all calls (:meth:`reset_stats`).
    """

    def __init__(self, base: torch.nn.Module, rl: torch.nn.Module, pad_token_id: int,
                 eos_token_id: int | Sequence[int] | None = None, *, config: ExtrapolationConfig | None = None,
                 batch_size: int = 512, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size: {batch_size} — must be >= 1")
        check_same_vocab(base, rl)
        self.config = config or ExtrapolationConfig()
        validate(self.config)
        self.base, self.rl = base.eval(), rl.eval()
        self.pad_token_id = int(pad_token_id)
        if eos_token_id is None:
            eos_token_id = getattr(base.config, "eos_token_id", None)
        eos = [] if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        self.eos_token_ids = tuple(int(t) for t in eos)
        self.batch_size = int(batch_size)
        # as every engine: a sample is cut ("length") at the shorter of the two models' contexts
        contexts = [c for m in (base, rl) if (c := getattr(m.config, "max_position_embeddings", None))]
        self.context_len: int | None = min(contexts) if contexts else None
        self.weight_version = 0
        self._seed_gen = torch.Generator().manual_seed(seed)
        self.stats = DecodeStats()
        self._closed = False

    def reset_stats(self) -> DecodeStats:
        """Return the counters so far and start new ones."""
        stats, self.stats = self.stats, DecodeStats()
        return stats

    def _config_for(self, params: SamplingParams) -> ExtrapolationConfig:
        if params.temperature <= 0:
            raise ValueError(f"SamplingParams.temperature: {params.temperature} — selective extrapolation "
                             "samples (§9.3 divides by T); use a temperature > 0")
        if params.top_k != -1:
            raise ValueError(f"SamplingParams.top_k: {params.top_k} — the candidates are the base model's "
                             f"top num_logprobs={self.config.num_logprobs}; leave top_k at -1")
        cfg = replace(self.config, temperature=params.temperature, top_p=params.top_p)
        validate(cfg)
        return cfg

    # ------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[GenerateRequest]) -> list[Sample]:
        if self._closed:
            raise RolloutError("ExtrapolatingEngine.generate: the engine is closed")
        requests = list(requests)
        rows = sample_slots(requests)
        seeds = {r.request_id: r.params.seed if r.params.seed is not None else int(
            torch.randint(_SEED_MOD, (1,), generator=self._seed_gen)) for r in requests}
        out: dict[tuple[str, int], Sample] = {}
        groups: dict[tuple, list[tuple[GenerateRequest, int]]] = {}
        for req, idx in rows:
            remaining = room_in_context(req, self.context_len)
            if remaining == 0:
                out[(req.request_id, idx)] = self._sample(req, idx, [], [], "length")
            else:  # requests that differ only in seed share micro-batches
                groups.setdefault((req.params.replace(n=1, seed=None), remaining), []).append((req, idx))
        for (params, remaining), group in groups.items():
            cfg = self._config_for(params)
            for start in range(0, len(group), self.batch_size):
                chunk = group[start:start + self.batch_size]
                row_seeds = [row_seed(seeds[r.request_id], r.request_id, i) for r, i in chunk]
                out.update(self._decode_chunk(chunk, params, cfg, remaining, row_seeds))
        return [out[(req.request_id, idx)] for req, idx in rows]

    @torch.no_grad()
    def _decode_chunk(self, chunk: list[tuple[GenerateRequest, int]], params: SamplingParams,
                      cfg: ExtrapolationConfig, max_new: int, row_seeds: list[int]) -> dict:
        device = next(self.base.parameters()).device
        input_ids, attention = left_padded([r.prompt_ids + r.response_prefix_ids for r, _ in chunk],
                                           self.pad_token_id)
        input_ids, attention = input_ids.to(device), attention.to(device)
        base = _CachedLM(self.base, input_ids, attention)
        rl = _CachedLM(self.rl, input_ids, attention)
        gens = [torch.Generator().manual_seed(s) for s in row_seeds]
        stop = torch.tensor(sorted(set(self.eos_token_ids) | set(params.stop_token_ids)), dtype=torch.long)
        n = len(chunk)
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        done = torch.zeros(n, dtype=torch.bool)
        for _ in range(max_new):
            uniforms = torch.stack([torch.rand(3, generator=g, dtype=torch.float64) for g in gens])
            step = extrapolation_step(base.logits, rl.logits, cfg, uniforms)
            emitted = step.tokens.cpu()
            lp = torch.log_softmax(base.logits.float() / cfg.temperature, dim=-1).gather(
                -1, step.tokens[:, None]).squeeze(1).cpu()
            live = ~done
            self.stats.tokens += int(live.sum())
            self.stats.selected += int((step.selected.cpu() & live).sum())
            self.stats.changed += int((step.selected.cpu() & (emitted != step.base_tokens.cpu()) & live).sum())
            for i in live.nonzero().flatten().tolist():
                tokens[i].append(int(emitted[i]))
                logprobs[i].append(float(lp[i]))
            done |= torch.isin(emitted, stop)
            if bool(done.all()):
                break
            feed = torch.where(done, torch.full_like(emitted, self.pad_token_id), emitted).to(device)
            base.advance(feed)
            rl.advance(feed)
        result = {}
        for i, (req, idx) in enumerate(chunk):
            reason = "stop" if tokens[i] and tokens[i][-1] in set(stop.tolist()) else "length"
            result[(req.request_id, idx)] = self._sample(req, idx, tokens[i], logprobs[i], reason)
        return result

    def _sample(self, req: GenerateRequest, idx: int, tokens: list[int], logprobs: list[float],
                reason: str) -> Sample:
        return req.sample(idx, tokens, logprobs, reason, self.weight_version)

    # ------------------------------------------------------------------ the rest of the protocol
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], **_kw) -> int:
        raise RolloutError("ExtrapolatingEngine decodes two fixed models for evaluation; it takes no "
                           "weight updates (use the embedded or SGLang engine for training)")

    def update_weights_from_disk(self, path: str | Path, **_kw) -> int:
        return self.update_weights(())

    def release_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        raise RolloutError("ExtrapolatingEngine is not colocated with a trainer; it holds its two models "
                           "for the whole evaluation (nothing to release)")

    def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        self.release_memory_occupation(tags)

    def abort(self, request_ids: Iterable[str] | None = None) -> None:
        """Nothing to abort: ``generate`` runs to completion in the caller's thread."""

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def health(self) -> bool:
        return not self._closed

    def close(self) -> None:
        self._closed = True
