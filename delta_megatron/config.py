"""The run configuration: one nested dataclass per component, composed into :class:`Config`.

Recipes in ``pipelines/`` are Python functions returning a ``Config``; YAML files and dotted
overrides (``algo.loss.name=sapo``) are views of the same dataclasses. ``Config.validate`` checks
every section and the cross-section rules, with errors that name the field path, the value and what
is allowed. Algorithm and credit sections live next to their code (``algo/``, ``credit/``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

from delta_megatron.actor.config import ActorConfig, TrainConfig
from delta_megatron.algo.config import AlgoConfig
from delta_megatron.checkpoint.config import CheckpointConfig
from delta_megatron.credit.config import CreditConfig
from delta_megatron.data.config import DataConfig
from delta_megatron.data.synthetic import SCAFFOLD_VOCAB, spec_variant
from delta_megatron.data.synthetic import VOCAB as SYNTHETIC_VOCAB
from delta_megatron.eval.config import EvalConfig
from delta_megatron.lifecycle import MemoryConfig
from delta_megatron.models.config import ModelConfig
from delta_megatron.parallel import ParallelConfig
from delta_megatron.reward.config import RewardConfig
from delta_megatron.rollout.config import RolloutConfig, SGLangConfig
from delta_megatron.tracking import LoggingConfig
from delta_megatron.utils.configs import (
    ConfigError,
    Section,
    apply_overrides,
    dump_yaml,
    fail,
    from_dict,
    load_yaml,
    option,
    to_dict,
    validate,
)

__all__ = [
    "Config", "ModelConfig", "ParallelConfig", "RolloutConfig", "SGLangConfig", "DataConfig",
    "TrainConfig", "CheckpointConfig", "LoggingConfig", "EvalConfig", "MemoryConfig", "ConfigError", "load_config",
    "to_dict", "dump_yaml", "apply_overrides", "from_dict", "recipe_config", "load_run_config", "check_vocab",
]


@dataclass
class Config(Section):
    model: ModelConfig = option(doc="the decoder's shapes and weights", default_factory=ModelConfig)
    parallel: ParallelConfig = option(doc="Megatron parallel layout", default_factory=ParallelConfig)
    rollout: RolloutConfig = option(doc="sampling and the rollout engine", default_factory=RolloutConfig)
    algo: AlgoConfig = option(doc="advantages, policy loss, KL, reward shaping, filters",
                              default_factory=AlgoConfig)
    credit: CreditConfig = option(doc="token credit assignment", default_factory=CreditConfig)
    reward: RewardConfig = option(doc="the verifier and its reward values", default_factory=RewardConfig)
    data: DataConfig = option(doc="training and eval data", default_factory=DataConfig)
    train: TrainConfig = option(doc="optimizer, schedule, PPO epochs, token budgets",
                                default_factory=TrainConfig)
    checkpoint: CheckpointConfig = option(doc="checkpoints and resume", default_factory=CheckpointConfig)
    logging: LoggingConfig = option(doc="run directory and metrics sinks", default_factory=LoggingConfig)
    eval: EvalConfig = option(doc="periodic evaluation", default_factory=EvalConfig)
    memory: MemoryConfig = option(doc="how the actor and a colocated rollout engine share the GPUs",
                                  default_factory=MemoryConfig)

    def validate(self) -> None:
        """Cross-section rules (each section validates itself first)."""
        heads, kv = self.model.num_attention_heads, self.model.num_key_value_heads
        if heads % self.parallel.tp or kv % self.parallel.tp:  # megatron splits query groups over TP
            fail("parallel.tp", self.parallel.tp,
                 f"must divide num_attention_heads={heads} and num_key_value_heads={kv}")
        if self.model.num_layers % self.parallel.pp:
            fail("parallel.pp", self.parallel.pp,
                 f"must divide model.num_layers={self.model.num_layers}")
        if self.parallel.vpp and self.model.num_layers % (self.parallel.pp * self.parallel.vpp):
            fail("parallel.vpp", self.parallel.vpp,
                 f"pp*vpp must divide model.num_layers={self.model.num_layers}")
        context = self.model.max_position_embeddings  # the engine never generates past the context
        for field_path, new_tokens in (("rollout.max_new_tokens", self.rollout.max_new_tokens),
                                       ("eval.max_new_tokens", self.eval.max_new_tokens)):
            if self.rollout.max_prompt_len + new_tokens > context:
                fail(field_path, new_tokens, f"rollout.max_prompt_len={self.rollout.max_prompt_len} + "
                     f"{field_path} must be <= model.max_position_embeddings={context}")
        if self.data.synthetic_scaffold_share:  # the scaffolded scratchpad and its larger vocabulary
            if not self.data.train.startswith("synthetic:") or spec_variant(self.data.train) != "scratchpad":
                fail("data.synthetic_scaffold_share", self.data.synthetic_scaffold_share,
                     f"a scaffold needs data.train=synthetic:arith-scratchpad (got {self.data.train!r}), or 0")
        tr = self.train
        if tr.recompute_granularity == "full":  # megatron recomputes within one model chunk
            chunk = self.model.num_layers // (self.parallel.pp * (self.parallel.vpp or 1))
            if tr.recompute_method == "uniform" and chunk % tr.recompute_num_layers:
                fail("train.recompute_num_layers", tr.recompute_num_layers,
                     f"uniform recompute needs a divisor of the {chunk} layers per model chunk "
                     "(num_layers / (pp * vpp))")
            if tr.recompute_method == "block" and tr.recompute_num_layers > chunk:
                fail("train.recompute_num_layers", tr.recompute_num_layers,
                     f"block recompute: at most the {chunk} layers per model chunk")
        delta = self.credit.delta
        if delta.proxy == "topk_hidden" and delta.topk_k > self.model.vocab_size:
            fail("credit.delta.topk_k", delta.topk_k, f"must be <= model.vocab_size={self.model.vocab_size}")
        if self.data.train.startswith("synthetic:") and self.data.tokenizer is None:
            vocab = SCAFFOLD_VOCAB if self.data.synthetic_scaffold_share else SYNTHETIC_VOCAB
            check_vocab(self.model.vocab_size, len(vocab), "the synthetic task's tokenizer")

    # ---------------------------------------------------------------- per-component views
    def actor_config(self) -> ActorConfig:
        """What the Megatron actor reads: its sections plus the two rollout facts the loss needs
        (log-probs at the sampling temperature; Dr.GRPO's L_const defaults to the response budget)."""
        return ActorConfig(model=self.model, parallel=self.parallel, train=self.train, algo=self.algo,
                           logprob_temperature=self.rollout.temperature,
                           loss_const=self.algo.loss_const or float(self.rollout.max_new_tokens))


def check_vocab(vocab_size: int, tokens: int, source: str) -> None:
    """``model.vocab_size`` must hold every id the tokenizer produces (else an IndexError mid-step)."""
    if vocab_size < tokens:
        raise ConfigError("model.vocab_size", vocab_size, f"must be >= {tokens}, the size of {source}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: Config | None = None) -> Config:
    """Load a YAML config (or start from ``base``/defaults), apply dotted overrides, validate."""
    if path is not None:
        return load_yaml(Config, path, overrides)
    cfg = base or Config()
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def recipe_config(spec: str) -> Config:
    """``module:function`` (or ``module``, calling ``config``) → the Config the recipe returns."""
    module, _, func = spec.partition(":")
    cfg = getattr(importlib.import_module(module), func or "config")()
    if not isinstance(cfg, Config):
        raise TypeError(f"recipe {spec!r} returned {type(cfg).__name__}, expected a Config")
    return cfg


def load_run_config(config: str | Path | None = None, recipe: str | None = None,
                    overrides: list[str] | None = None) -> Config:
    """The one way every command builds a run config: a YAML file or a recipe (or the defaults),
    then dotted overrides, then validation."""
    if config is not None and recipe is not None:
        raise ValueError("give a YAML config or a recipe, not both")
    if config is not None:
        return load_config(config, overrides)
    return load_config(overrides=overrides, base=recipe_config(recipe) if recipe else None)
