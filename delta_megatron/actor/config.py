"""The ``train`` section (optimizer, schedule, PPO epochs, token budgets) and :class:`ActorConfig`,
the actor's own config, composed from the run config's sections by ``Config.actor_config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from delta_megatron.algo.config import AlgoConfig
from delta_megatron.models.config import ModelConfig
from delta_megatron.parallel import ParallelConfig
from delta_megatron.utils.configs import Section, fail, option

#: selective recompute submodules of a dense layer (megatron-core's ``recompute_modules``). Not
#: "layernorm": the Transformer Engine spec fuses both norms into the next linear (nothing to
#: recompute), and megatron-core 0.16's path for separate norms needs TE even without FP8.
RECOMPUTE_MODULES = ("core_attn", "mlp")


@dataclass
class TrainConfig(Section):
    steps: int = option(60, "RL steps (rollout batches)", ge=1)
    prompts_per_step: int = option(64, "prompts per rollout batch (each sampled rollout.n_samples times)",
                                   ge=1)
    mini_batches: int = option(2, "optimizer steps per rollout batch (per PPO epoch); divides "
                                  "prompts_per_step", ge=1)
    ppo_epochs: int = option(1, "passes over each rollout batch", ge=1)
    lr: float = option(5e-4, "peak learning rate", gt=0)
    min_lr: float = option(0.0, "final learning rate of the cosine/linear decay; <= lr", ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = option("constant", "learning-rate decay after "
                                                                               "warm-up")
    warmup_steps: int = option(5, "RL steps of linear warm-up from 0; <= steps", ge=0)
    weight_decay: float = option(0.0, "AdamW decoupled weight decay", ge=0)
    adam_betas: tuple[float, float] = option((0.9, 0.999), "Adam (beta1, beta2)", ge=0, lt=1)
    adam_eps: float = option(1e-8, "Adam epsilon", gt=0)
    grad_clip: float = option(1.0, "global gradient-norm clip; 0 = off", ge=0)
    max_tokens_per_gpu_logprob: int = option(16384, "token budget of one log-prob micro-batch per GPU", ge=1)
    max_tokens_per_gpu_train: int = option(8192, "token budget of one train micro-batch per GPU", ge=1)
    logprob_chunk_tokens: int = option(1024, "tokens per vocab chunk in the log-prob kernel", ge=1)
    seed: int = option(1234, "seed of init, sampling and every random draw", ge=0)
    deterministic: bool = option(True, "deterministic kernels (megatron deterministic_mode; on CUDA also "
                                       "torch deterministic algorithms and cuBLAS workspace)")
    recompute_granularity: Literal["none", "full", "selective"] = option(
        "none", "activation recompute in the train pass: whole layers (full), some submodules "
                "(selective) or none (megatron-core recompute_granularity)")
    recompute_method: Literal["uniform", "block"] = option(
        "uniform", "full recompute: uniform = every group of recompute_num_layers layers keeps only its "
                   "input; block = only the first recompute_num_layers layers of each stage recompute")
    recompute_num_layers: int = option(1, "full recompute: layers per group (uniform) or layers "
                                          "recomputed per pipeline stage (block)", ge=1)
    recompute_modules: list[str] = option(default_factory=lambda: ["core_attn"],
                                          doc="selective recompute: submodules among core_attn, mlp")

    def recompute_overrides(self) -> dict:
        """megatron-core TransformerConfig fields for the configured recompute."""
        if self.recompute_granularity == "none":
            return {}
        if self.recompute_granularity == "selective":
            return {"recompute_granularity": "selective", "recompute_modules": list(self.recompute_modules)}
        return {"recompute_granularity": "full", "recompute_method": self.recompute_method,
                "recompute_num_layers": self.recompute_num_layers}

    def validate(self) -> None:
        if self.prompts_per_step % self.mini_batches:
            fail("mini_batches", self.mini_batches,
                 f"must divide prompts_per_step={self.prompts_per_step}")
        if self.warmup_steps > self.steps:
            fail("warmup_steps", self.warmup_steps, f"must be <= steps={self.steps}")
        if self.min_lr > self.lr:
            fail("min_lr", self.min_lr, f"must be <= lr={self.lr:g}")
        unknown = [m for m in self.recompute_modules if m not in RECOMPUTE_MODULES]
        if unknown or (self.recompute_granularity == "selective" and not self.recompute_modules):
            fail("recompute_modules", self.recompute_modules,
                 f"a non-empty subset of {', '.join(RECOMPUTE_MODULES)} (dense layers)")


@dataclass
class ActorConfig(Section):
    """Everything the Megatron actor reads, and nothing more; not a YAML section of its own but a
    view of the run config (``Config.actor_config``), so the actor never reads ``rollout.*``."""

    model: ModelConfig = option(doc="the model section", default_factory=ModelConfig)
    parallel: ParallelConfig = option(doc="the parallel section", default_factory=ParallelConfig)
    train: TrainConfig = option(doc="the train section", default_factory=TrainConfig)
    algo: AlgoConfig = option(doc="the algo section", default_factory=AlgoConfig)
    logprob_temperature: float = option(1.0, "π_old is the sampling distribution: log-probs at its "
                                             "temperature", gt=0)
    loss_const: float = option(32.0, "Dr.GRPO L_const (algo.loss_const, default rollout.max_new_tokens)",
                               gt=0)
