"""Builders: each turns the run config into one component the trainer (or a command) uses —
tokenizer, datasets, prompt encoder, reward, rollout engine, actor. Keeping construction here lets
``trainer.py`` read like the algorithm (STYLE.md §1) and the components take only their own config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from delta_megatron.config import Config, ConfigError, check_vocab
from delta_megatron.data.datasets import load_dataset
from delta_megatron.data.limits import limit_prompt_length
from delta_megatron.data.synthetic import ArithmeticConfig, ArithmeticTask, spec_variant, synthetic_dataset
from delta_megatron.data.templates import BOXED_INSTRUCTION, encode_prompt, render_prompt
from delta_megatron.data.types import Example, PromptDataset
from delta_megatron.rollout.requests import PromptEncoder


def is_synthetic(cfg: Config) -> bool:
    return cfg.data.train.startswith("synthetic:")


def arithmetic_task(cfg: Config) -> ArithmeticTask:
    return ArithmeticTask(ArithmeticConfig(digits=cfg.data.synthetic_digits, variant=spec_variant(cfg.data.train),
                                           size=cfg.data.synthetic_size, seed=cfg.data.shuffle_seed,
                                           scaffold_share=cfg.data.synthetic_scaffold_share))


def build_tokenizer(cfg: Config, out_dir: Path | None = None):
    """The HF tokenizer: the synthetic task's character tokenizer (saved to ``out_dir`` so HF exports
    carry it), else ``data.tokenizer`` or ``model.hf_path``. Fails before any work when
    ``model.vocab_size`` cannot hold the tokenizer's ids."""
    from transformers import AutoTokenizer

    if is_synthetic(cfg) and cfg.data.tokenizer is None:
        from delta_megatron.data.tokenizer import build_char_tokenizer, load_hf_tokenizer, save_char_tokenizer

        path = Path(out_dir or Path(cfg.logging.dir)) / "tokenizer"
        if not (path / "tokenizer.json").exists():
            task = arithmetic_task(cfg)
            save_char_tokenizer(path, build_char_tokenizer(task.vocab, words=task.words))
        tokenizer = load_hf_tokenizer(path)
    else:
        path = cfg.data.tokenizer or cfg.model.hf_path
        if path is None:
            raise ConfigError("data.tokenizer", None, "real datasets need a tokenizer directory "
                              "(data.tokenizer or model.hf_path)")
        tokenizer, path = AutoTokenizer.from_pretrained(path), Path(path)
    check_vocab(cfg.model.vocab_size, len(tokenizer), f"the tokenizer in {path}")
    return tokenizer, path


def build_datasets(cfg: Config, encode: PromptEncoder | None = None) -> tuple[PromptDataset, list[PromptDataset]]:
    """Training and eval sets; with ``encode`` (the run's prompt encoder) prompts longer than
    ``rollout.max_prompt_len`` tokens are dropped or fail the run (``rollout.long_prompts``)."""
    if is_synthetic(cfg):
        task = arithmetic_task(cfg)
        train = synthetic_dataset(cfg.data.train, task.cfg)
        evals = [synthetic_dataset(cfg.data.train.split("@")[0] + "@eval", task.cfg)]
    else:
        train = load_dataset(cfg.data.train)
        evals = [load_dataset(spec, max_rows=cfg.data.max_eval_rows) for spec in cfg.data.eval]
    if encode is not None:
        train, evals = limit_prompts(cfg, train, encode), [limit_prompts(cfg, ds, encode) for ds in evals]
    return train, evals


def limit_prompts(cfg: Config, dataset: PromptDataset, encode: PromptEncoder) -> PromptDataset:
    """``dataset`` without prompts over ``rollout.max_prompt_len`` tokens (or an error, per
    ``rollout.long_prompts``)."""
    return limit_prompt_length(dataset, encode, cfg.rollout.max_prompt_len, cfg.rollout.long_prompts)


def prompt_encoder(cfg: Config, tokenizer: Any) -> PromptEncoder:
    """Example → prompt token ids under the configured template (the synthetic task has no
    instruction; real math data asks for a boxed answer)."""
    template = cfg.data.resolved_template
    instruction = None if is_synthetic(cfg) else BOXED_INSTRUCTION

    def encode(example: Example) -> list[int]:
        return encode_prompt(tokenizer, render_prompt(example, template, tokenizer, instruction=instruction),
                             template)

    return encode


def build_reward(cfg: Config):
    from delta_megatron.reward import build_reward as _build

    extract = arithmetic_task(cfg).extract if is_synthetic(cfg) else None
    return _build(cfg.reward, cfg.data.train, extract_fn=extract)


def engine_on_own_nodes(cfg: Config) -> bool:
    """SGLang servers on nodes of their own (``rollout.placement: disaggregated``)."""
    return cfg.rollout.engine == "sglang" and cfg.rollout.placement == "disaggregated"


def build_ledger(cfg: Config, gpus: int):
    """The memory ledger of this run (memory_ledger.py): this device's size sets SGLang's pool."""
    import torch

    from delta_megatron.memory_ledger import memory_ledger

    hbm = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory \
        if torch.cuda.is_available() else 0.0
    return memory_ledger(cfg, gpus=gpus, hbm_bytes=hbm,
                         rollout_nodes=cfg.rollout.nodes if engine_on_own_nodes(cfg) else 0)


def build_rollout(cfg: Config, tokenizer: Any, groups: Any, out_dir: str | Path):
    """Collective: this rank's rollout pieces (``RolloutRuntime``: generation engine, weight route,
    servers it started) for ``rollout.engine`` and ``rollout.placement`` (embedded: an HF model of the
    same architecture on rank 0)."""
    from delta_megatron.rollout import make_engine
    from delta_megatron.rollout.placement import build_rollout_runtime

    def embedded():
        from delta_megatron.models.hf_config import build_hf_model

        return make_engine(cfg.rollout, model=build_hf_model(cfg.model, seed=cfg.train.seed),
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           seed=cfg.train.seed)

    return build_rollout_runtime(cfg.rollout, cfg.parallel, groups, model_path=cfg.model.hf_path,
                                 log_dir=out_dir, embedded=embedded,
                                 context_len=cfg.model.max_position_embeddings)


def build_actor(cfg: Config, groups: Any = None, total_optimizer_steps: int | None = None,
                data_sharded: bool = False):
    """The Megatron actor on this rank's share of the layout (its own view of the config).
    ``data_sharded``: batches hold this data-parallel replica's samples only (the trainer's
    :mod:`~delta_megatron.dataflow`), not the whole batch."""
    from delta_megatron.actor.megatron_actor import MegatronActor

    return MegatronActor(cfg.actor_config(), groups, total_optimizer_steps=total_optimizer_steps,
                         data_sharded=data_sharded)
