"""The ``train`` section (optimizer, schedule, PPO epochs, token budgets) and :class:`ActorConfig`,
the actor's own config, composed from the run config's sections by ``Config.actor_config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from delta_megatron.algo.config import AlgoConfig
from delta_megatron.models.config import ModelConfig
from delta_megatron.parallel import ParallelConfig
from delta_megatron.utils.configs import check_range, fail


@dataclass
class TrainConfig:
    steps: int = 60
    prompts_per_step: int = 64
    mini_batches: int = 2  # optimizer steps per rollout batch (per PPO epoch)
    ppo_epochs: int = 1
    lr: float = 5e-4
    min_lr: float = 0.0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 5
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    max_tokens_per_gpu_logprob: int = 16384
    max_tokens_per_gpu_train: int = 8192
    logprob_chunk_tokens: int = 1024  # tokens per vocab chunk loop in the log-prob kernel
    seed: int = 1234
    deterministic: bool = True

    def validate(self) -> None:
        for name in ("steps", "prompts_per_step", "mini_batches", "ppo_epochs",
                     "max_tokens_per_gpu_logprob", "max_tokens_per_gpu_train", "logprob_chunk_tokens"):
            if getattr(self, name) < 1:
                fail(name, getattr(self, name), "must be >= 1")
        if self.prompts_per_step % self.mini_batches:
            fail("mini_batches", self.mini_batches,
                 f"must divide prompts_per_step={self.prompts_per_step}")
        check_range("lr", self.lr, 0, None, lo_open=True)
        check_range("grad_clip", self.grad_clip, 0, None)
        if self.warmup_steps < 0:
            fail("warmup_steps", self.warmup_steps, "must be >= 0")


@dataclass
class ActorConfig:
    """Everything the Megatron actor reads, and nothing more; not a YAML section of its own but a
    view of the run config (``Config.actor_config``), so the actor never reads ``rollout.*``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    logprob_temperature: float = 1.0  # π_old is the sampling distribution: log-probs at its temperature
    loss_const: float = 32.0  # Dr.GRPO L_const (algo.loss_const, default rollout.max_new_tokens)
