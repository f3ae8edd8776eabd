"""Builders and glue the trainer calls one level down: tokenizer, datasets, reward, rollout engine,
samples → RolloutBatch, and weight sync from the actor to the engine.

Keeping these here lets ``trainer.py`` read like the algorithm (STYLE.md §1).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from delta_megatron.batch import RolloutBatch
from delta_megatron.config import Config
from delta_megatron.data.datasets import Example, PromptDataset, load_dataset
from delta_megatron.data.synthetic import ArithmeticConfig, ArithmeticTask, spec_variant, synthetic_dataset
from delta_megatron.data.templates import BOXED_INSTRUCTION, encode_prompt, render_prompt
from delta_megatron.rollout.engine import GenerateRequest, Sample, SamplingParams


def is_synthetic(cfg: Config) -> bool:
    return cfg.data.train.startswith("synthetic:")


def arithmetic_task(cfg: Config) -> ArithmeticTask:
    return ArithmeticTask(ArithmeticConfig(digits=cfg.data.synthetic_digits, variant=spec_variant(cfg.data.train),
                                           size=cfg.data.synthetic_size, seed=cfg.data.shuffle_seed))


def build_tokenizer(cfg: Config, out_dir: Path | None = None):
    """The HF tokenizer: the synthetic task's character tokenizer (saved to ``out_dir`` so HF exports
    carry it), else ``data.tokenizer`` or ``model.hf_path``."""
    from transformers import AutoTokenizer

    if is_synthetic(cfg) and cfg.data.tokenizer is None:
        from delta_megatron.data.tokenizer import load_hf_tokenizer, save_char_tokenizer

        path = Path(out_dir or Path(cfg.logging.dir)) / "tokenizer"
        if not (path / "tokenizer.json").exists():
            save_char_tokenizer(path)
        return load_hf_tokenizer(path), path
    path = cfg.data.tokenizer or cfg.model.hf_path
    if path is None:
        raise ValueError("data.tokenizer: null — real datasets need a tokenizer directory "
                         "(data.tokenizer or model.hf_path)")
    return AutoTokenizer.from_pretrained(path), Path(path)


def build_datasets(cfg: Config) -> tuple[PromptDataset, list[PromptDataset]]:
    if is_synthetic(cfg):
        task = arithmetic_task(cfg)
        train = synthetic_dataset(cfg.data.train, task.cfg)
        evals = [synthetic_dataset(cfg.data.train.split("@")[0] + "@eval", task.cfg)]
    else:
        train = load_dataset(cfg.data.train)
        evals = [load_dataset(spec, max_rows=cfg.data.max_eval_rows) for spec in cfg.data.eval]
    return train, evals


def build_reward(cfg: Config):
    from delta_megatron.reward import build_reward as _build

    extract = arithmetic_task(cfg).extract if is_synthetic(cfg) else None
    return _build(cfg.reward, cfg.data.train, extract_fn=extract)


def build_engine(cfg: Config, tokenizer: Any):
    """The rollout engine of ``rollout.engine`` (embedded: an HF model of the same architecture)."""
    if cfg.rollout.engine == "embedded":
        from delta_megatron.models.hf_config import build_hf_model
        from delta_megatron.rollout.embedded import EmbeddedEngine

        model = build_hf_model(cfg.model, seed=cfg.train.seed)
        return EmbeddedEngine(model, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id, config=cfg.rollout, seed=cfg.train.seed)
    import os

    from delta_megatron.rollout.sglang_engine import SGLangEngine

    router = os.environ.get("DELTA_MEGATRON_SGLANG_ROUTER")
    if router:  # heterogeneous job: the launcher started servers + router on their own nodes
        from delta_megatron.rollout.sglang_server import wait_healthy

        wait_healthy(router, timeout_s=cfg.rollout.sglang.request_timeout_s)
        return SGLangEngine(router, config=cfg.rollout.sglang)
    if cfg.model.hf_path is None:
        raise ValueError("rollout.engine: 'sglang' — SGLang servers start from an HF checkpoint; "
                         "set model.hf_path")
    return SGLangEngine.launch(cfg.model.hf_path, cfg.rollout.sglang)


def prompt_ids(cfg: Config, tokenizer: Any, example: Example) -> list[int]:
    template = cfg.data.resolved_template
    text = render_prompt(example, template, tokenizer,
                         instruction=None if is_synthetic(cfg) else BOXED_INSTRUCTION)
    return encode_prompt(tokenizer, text, template)


def step_seed(seed: int, step: int, what: str) -> int:
    """A per-step seed independent of any RNG state, so a resumed run draws the same samples."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{step}/{what}".encode()).digest()[:4], "little")


def requests_for(cfg: Config, tokenizer: Any, examples: Sequence[Example], step: int, first_group: int,
                 params: SamplingParams | None = None) -> list[GenerateRequest]:
    # one seed per step and round: equal params let the engine batch all requests together
    params = (params or SamplingParams.from_config(cfg.rollout)).replace(
        seed=step_seed(cfg.train.seed, step, f"round{first_group}"))
    return [GenerateRequest(request_id=f"s{step}-g{first_group + i}", group_id=first_group + i,
                            prompt_ids=prompt_ids(cfg, tokenizer, ex), params=params)
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


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank (the rollout batch is produced on rank 0)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sync_weights(actor: Any, engine: Any, bucket_bytes: int = 512 << 20) -> int:
    """Actor → engine through the one HF-name converter. The embedded engine lives on rank 0; every
    rank takes part in the export (TP gathers), and pipeline stages' senders ship to rank 0."""
    buckets = [list(b) for b in actor.named_hf_weights(bucket_bytes)]
    if dist.is_initialized() and dist.get_world_size() > 1 and actor.groups.pp_size > 1:
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(buckets, gathered, dst=0)
        buckets = [b for part in (gathered or []) for b in part]
    if engine is None:
        return 0
    named = [item for bucket in buckets for item in bucket]
    engine.update_weights(named)  # one strict update: every engine weight, nothing unknown
    return len(named)
