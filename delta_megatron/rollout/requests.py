"""Between examples and engines: generate requests, engine samples → a packed RolloutBatch, and the
one text-generation helper that both the trainer's periodic eval and ``delta-megatron eval`` use."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from delta_megatron.batch import RolloutBatch
from delta_megatron.data.types import Example
from delta_megatron.rollout.engine import GenerateRequest, RolloutEngine, Sample, SamplingParams

__all__ = ["PromptEncoder", "step_seed", "requests_for", "samples_to_batch", "text_generator"]

PromptEncoder = Callable[[Example], list[int]]  # example → prompt token ids (template applied)


def step_seed(seed: int, step: int, what: str) -> int:
    """A per-step seed independent of any RNG state, so a resumed run draws the same samples."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{what}".encode()).digest()[:4], "little")


def requests_for(examples: Sequence[Example], encode: PromptEncoder, params: SamplingParams, step: int,
                 first_group: int) -> list[GenerateRequest]:
    """One request per example, group ids ``first_group …``; equal ``params`` (one seed per call) let
    the engine batch all of them together."""
    return [GenerateRequest(request_id=f"s{step}-g{first_group + i}", group_id=first_group + i,
                            prompt_ids=encode(ex), params=params)
            for i, ex in enumerate(examples)]


def samples_to_batch(samples: Sequence[Sample], examples: dict[int, Example], tokenizer: Any) -> RolloutBatch:
    """Packed RolloutBatch of engine samples, with texts and gold answers for the reward stage."""
    ordered = sorted(samples, key=lambda s: (int(s.group_id), s.index))
    batch = RolloutBatch.from_samples(
        [s.prompt_ids for s in ordered], [s.response_ids for s in ordered],
        group_id=torch.tensor([int(s.group_id) for s in ordered]),
        truncated=torch.tensor([s.truncated for s in ordered]),
        response_text=[tokenizer.decode(s.response_ids, skip_special_tokens=True) for s in ordered],
        answer=[examples[int(s.group_id)].answer for s in ordered],
        example_id=[examples[int(s.group_id)].id for s in ordered])
    logp = torch.zeros(batch.num_tokens)
    logp[batch.response_mask] = torch.tensor([lp for s in ordered for lp in s.logprobs], dtype=torch.float32)
    batch.add_token_field("logp_rollout", logp)
    return batch


def text_generator(engine: RolloutEngine, tokenizer: Any, encode: PromptEncoder,
                   seed_for_call: Callable[[int], int]):
    """An evaluator ``generate_fn(examples, n, temperature, top_p, max_new_tokens) -> texts`` on
    ``engine``; call ``c`` (0, 1, …) samples with seed ``seed_for_call(c)`` (reproducible runs)."""
    calls = [0]

    def generate(examples, n, temperature, top_p, max_new_tokens):
        params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, n=n,
                                seed=seed_for_call(calls[0]))
        calls[0] += 1
        samples = engine.generate(requests_for(examples, encode, params, step=calls[0], first_group=0))
        texts: list[list[str]] = [[] for _ in examples]
        for s in sorted(samples, key=lambda s: (int(s.group_id), s.index)):
            texts[int(s.group_id)].append(tokenizer.decode(s.response_ids, skip_special_tokens=True))
        return texts

    return generate
