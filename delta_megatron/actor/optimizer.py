"""megatron-core optimizer (Adam, optionally distributed), DDP wrapping and the LR schedule.

``calculate_per_token_loss`` is on: each micro-batch reports (loss·N, n_local) and megatron's
``finalize_model_grads`` divides the summed gradients by Σ n_local over DP×CP = N. With our loss
shares already globally normalised this makes gradient accumulation exact for any DP/CP layout and
micro-batch split (the DDP all-reduce then sums instead of averaging).
"""

from __future__ import annotations

import torch

from delta_megatron.actor.config import TrainConfig
from delta_megatron.models.config import ModelConfig
from delta_megatron.parallel import ParallelConfig


def wrap_ddp(chunks: list, parallel: ParallelConfig) -> list:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.distributed_optimizer,
        check_for_nan_in_grad=True,
    )
    return [DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=(i > 0)) for i, chunk in enumerate(chunks)]


def build_optimizer(chunks: list, model: ModelConfig, parallel: ParallelConfig, train: TrainConfig,
                    total_optimizer_steps: int):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    bf16 = model.params_dtype == "bfloat16"
    cfg = OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_betas[0],
        adam_beta2=train.adam_betas[1],
        adam_eps=train.adam_eps,
        clip_grad=train.grad_clip,
        bf16=bf16,
        fp16=model.params_dtype == "float16",
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(cfg, chunks)
    steps_per_rl_step = max(1, total_optimizer_steps // max(train.steps, 1))
    warmup = train.warmup_steps * steps_per_rl_step
    decay = max(total_optimizer_steps, warmup + 1)
    style = {"constant": "constant", "cosine": "cosine", "linear": "linear"}[train.lr_schedule]
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else train.lr, max_lr=train.lr, min_lr=train.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=decay, lr_decay_style=style,
        start_wd=train.weight_decay, end_wd=train.weight_decay, wd_incr_steps=decay,
        wd_incr_style="constant")
    return optimizer, scheduler
