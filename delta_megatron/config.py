"""The run configuration: one nested dataclass per component, composed into :class:`Config`.

Recipes in ``pipelines/`` are Python functions returning a ``Config``; YAML files and dotted
overrides (``algo.loss.name=sapo``) are views of the same dataclasses. ``Config.validate`` checks
every section and the cross-section rules, with errors that name the field path, the value and what
is allowed. Algorithm and credit sections live next to their code (``algo/``, ``credit/``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from delta_megatron.algo.config import AlgoConfig
from delta_megatron.credit.config import CreditConfig
from delta_megatron.reward.config import RewardConfig
from delta_megatron.utils.configs import (
    ConfigError,
    apply_overrides,
    check_range,
    dump_yaml,
    fail,
    from_dict,
    load_yaml,
    to_dict,
    validate,
)

__all__ = [
    "Config", "ModelConfig", "ParallelConfig", "RolloutConfig", "SGLangConfig", "DataConfig",
    "TrainConfig", "CheckpointConfig", "LoggingConfig", "EvalConfig", "ConfigError", "load_config",
    "to_dict", "dump_yaml", "apply_overrides", "from_dict",
]


@dataclass
class ModelConfig:
    """An HF-style decoder config (Qwen3 / Qwen2 / Llama). The actor builds a megatron-core GPTModel
    from it and the embedded engine an HF model, so both sides agree on every shape."""

    arch: Literal["qwen3", "qwen2", "llama"] = "qwen3"
    vocab_size: int = 32
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # default hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    qk_norm: bool | None = None  # default: True for qwen3, False otherwise
    attention_bias: bool | None = None  # default: True (qkv) for qwen2, False otherwise
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    init_std: float = 0.02
    hf_path: str | None = None  # load weights from an HF checkpoint directory instead of random init

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def use_qk_norm(self) -> bool:
        return self.arch == "qwen3" if self.qk_norm is None else self.qk_norm

    @property
    def use_qkv_bias(self) -> bool:
        return self.arch == "qwen2" if self.attention_bias is None else self.attention_bias

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                fail(name, getattr(self, name), "must be >= 1")
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", self.num_key_value_heads,
                 f"must divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            fail("hidden_size", self.hidden_size,
                 f"must be divisible by num_attention_heads={self.num_attention_heads} (or set head_dim)")
        check_range("rope_theta", self.rope_theta, 0, None, lo_open=True)


@dataclass
class ParallelConfig:
    """Megatron parallel layout. CP attention and FP8 need Transformer Engine (GPU only)."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    vpp: int | None = None  # virtual pipeline stages per rank (interleaved 1F1B)
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    layer_spec: Literal["auto", "local", "te"] = "auto"  # auto: TE when importable and CUDA present
    fp8: Literal["none", "delayed", "current", "mxfp8"] = "none"
    backend: Literal["auto", "nccl", "gloo"] = "auto"

    def validate(self) -> None:
        for name in ("tp", "pp", "cp"):
            if getattr(self, name) < 1:
                fail(name, getattr(self, name), "must be >= 1")
        if self.vpp is not None and (self.vpp < 2 or self.pp < 2):
            fail("vpp", self.vpp, "interleaved pipelining needs vpp >= 2 and pp >= 2 (or vpp: null)")
        if self.sequence_parallel and self.tp == 1:
            fail("sequence_parallel", True, "needs tp > 1")
        if self.cp > 1 and self.layer_spec == "local":
            fail("cp", self.cp, "context parallelism needs the Transformer Engine layer spec "
                               "(parallel.layer_spec: te or auto on a GPU with transformer-engine)")
        if self.fp8 != "none" and self.layer_spec == "local":
            fail("fp8", self.fp8, "FP8 needs the Transformer Engine layer spec (parallel.layer_spec: te)")


@dataclass
class SGLangConfig:
    """SGLang servers + router (GPU extra)."""

    num_servers: int = 1
    tp: int = 1
    mem_fraction: float = 0.7
    port_base: int = 30000
    router_port: int = 29000
    request_timeout_s: float = 600.0
    max_retries: int = 3
    max_concurrency: int = 256
    weight_sync: Literal["ipc", "nccl", "disk"] = "ipc"
    sync_bucket_mb: int = 512
    check_weights: bool = False
    extra_args: list[str] = field(default_factory=list)

    def validate(self) -> None:
        check_range("mem_fraction", self.mem_fraction, 0, 1, lo_open=True)
        if self.num_servers < 1:
            fail("num_servers", self.num_servers, "must be >= 1")


@dataclass
class RolloutConfig:
    engine: Literal["embedded", "sglang"] = "embedded"
    n_samples: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 32
    max_prompt_len: int = 64
    batch_size: int = 512  # sequences generated together by the embedded engine
    sglang: SGLangConfig = field(default_factory=SGLangConfig)

    def validate(self) -> None:
        if self.n_samples < 1:
            fail("n_samples", self.n_samples, "must be >= 1")
        check_range("temperature", self.temperature, 0, None, lo_open=True)
        check_range("top_p", self.top_p, 0, 1, lo_open=True)
        if self.max_new_tokens < 1:
            fail("max_new_tokens", self.max_new_tokens, "must be >= 1")


@dataclass
class DataConfig:
    train: str = "synthetic:arith"  # a jsonl/parquet path, or synthetic:<task>
    eval: list[str] = field(default_factory=list)
    template: Literal["auto", "plain", "chat", "none"] = "auto"  # auto: none for synthetic data
    tokenizer: str | None = None  # HF tokenizer dir; default: model.hf_path, or the synthetic task's
    shuffle_seed: int = 0
    synthetic_digits: int = 3
    synthetic_size: int = 4096
    max_eval_rows: int | None = None

    @property
    def resolved_template(self) -> str:
        if self.template != "auto":
            return self.template
        return "none" if self.train.startswith("synthetic:") else "plain"


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
class CheckpointConfig:
    dir: str | None = None  # default: <logging.dir>/checkpoints
    every: int = 0  # steps between saves; 0 = only at the end
    keep: int = 2
    resume: str = "none"  # none | auto | <path>


@dataclass
class LoggingConfig:
    dir: str = "runs/default"
    jsonl: bool = True
    tensorboard: bool = True
    wandb_project: str | None = None
    progress: bool = True
    log_every: int = 1


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations; 0 = off
    k: int = 16
    temperature: float = 1.0
    top_p: float = 0.7
    max_new_tokens: int = 32
    max_prompts: int | None = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    credit: CreditConfig = field(default_factory=CreditConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

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
        delta = self.credit.delta
        if delta.proxy == "topk_hidden" and delta.topk_k > self.model.vocab_size:
            fail("credit.delta.topk_k", delta.topk_k, f"must be <= model.vocab_size={self.model.vocab_size}")


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
