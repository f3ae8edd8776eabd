"""Qwen3-8B/14B/32B DelTA recipes on B200 nodes with 20k-token responses (delta.md §7.1).

Paper settings shared by every run: 128 prompts x 16 responses, PPO mini-batch of 32 prompts
(4 optimizer steps per rollout batch, one epoch), prompts <= 2048 and responses <= 20480 tokens,
clip 0.2 / 0.28 with dual clip 10, token-mean loss, lr 1e-6 without warm-up, weight decay 0.1, grad
clip 1, no KL or entropy terms, T = 1 / top-p 1, no dynamic sampling, overlong shaping with a 4096-token
buffer, SGLang rollout (TP 1, 70 % of memory). DelTA: K = 1, λ ∈ [0.8, 1.2].

The parallel layout per model and node count is chosen so that ``delta-megatron plan`` accepts it on
the ``b200`` profile at the worst case (every response 20480 tokens); ``fp8=True`` switches the actor
to Transformer Engine FP8 (delayed scaling). ``table3`` is the paper's comparison (DAPO, DAPO with
Forking Tokens, SAPO, FIPO, DelTA) as one experiment of five runs.
"""

from __future__ import annotations

from delta_megatron.config import Config, ModelConfig, ParallelConfig
from delta_megatron.utils.configs import ConfigError, validate

HF_ROOT = "/data/models"  # the profile mounts ${DELTA_DATA} here

QWEN3 = {  # HF config.json of the base models
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_layers=36, num_attention_heads=32,
               steps=220),
    "14b": dict(hidden_size=5120, intermediate_size=17408, num_layers=40, num_attention_heads=40,
                steps=300),
    "32b": dict(hidden_size=5120, intermediate_size=25600, num_layers=64, num_attention_heads=64,
                steps=300),
}

# (nodes) -> tp, pp, cp, tokens per GPU per micro-batch; checked by tests/launch/test_recipes.py
LAYOUTS = {
    "8b": {1: (2, 1, 2, 16384), 2: (2, 1, 2, 16384), 4: (2, 1, 2, 16384), 8: (2, 1, 2, 16384)},
    "14b": {1: (4, 1, 2, 16384), 2: (4, 1, 2, 16384), 4: (4, 1, 2, 16384), 8: (4, 1, 2, 16384)},
    "32b": {2: (8, 1, 2, 16384), 4: (8, 1, 2, 16384), 8: (8, 1, 2, 16384)},
}
# SGLang tp and memory fraction: the paper's (1, 0.7); 32B weights (65 GB) leave too little KV cache on
# one GPU. Colocated, the actor keeps only its weights on the GPU while SGLang generates (memory.*).
SGLANG = {"8b": (1, 0.7), "14b": (1, 0.7), "32b": (2, 0.7)}
# FP8 keeps an fp8 copy (+ transpose) of every linear weight next to the bf16 one: less room for SGLang
SGLANG_FP8_FRACTION = {"8b": 0.7, "14b": 0.65, "32b": 0.65}


def qwen3_model(size: str) -> ModelConfig:
    q = QWEN3[size]
    return ModelConfig(arch="qwen3", vocab_size=151936, hidden_size=q["hidden_size"],
                       intermediate_size=q["intermediate_size"], num_layers=q["num_layers"],
                       num_attention_heads=q["num_attention_heads"], num_key_value_heads=8,
                       head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                       max_position_embeddings=40960, tie_word_embeddings=False, qk_norm=True,
                       params_dtype="bfloat16", hf_path=f"{HF_ROOT}/Qwen3-{size.upper()}-Base")


def paper_config(size: str, *, nodes: int = 1, fp8: bool = False) -> Config:
    """DAPO with the paper's shared hyper-parameters (no credit method yet)."""
    if nodes not in LAYOUTS[size]:
        raise ConfigError("nodes", nodes, f"Qwen3-{size.upper()} layouts: {sorted(LAYOUTS[size])}")
    tp, pp, cp, tokens = LAYOUTS[size][nodes]
    cfg = Config(model=qwen3_model(size))
    cfg.parallel = ParallelConfig(tp=tp, pp=pp, cp=cp, sequence_parallel=tp > 1,
                                  distributed_optimizer=True, layer_spec="te",
                                  fp8="delayed" if fp8 else "none", backend="nccl")
    ro = cfg.rollout
    ro.engine, ro.n_samples, ro.temperature, ro.top_p, ro.top_k = "sglang", 16, 1.0, 1.0, -1
    ro.max_prompt_len, ro.max_new_tokens = 2048, 20480
    ro.sglang.tp, ro.sglang.mem_fraction = SGLANG[size]
    if fp8:
        ro.sglang.mem_fraction = SGLANG_FP8_FRACTION[size]
    ro.sglang.max_concurrency = 2048  # every response of the batch in flight at once
    cfg.data.train, cfg.data.template = "/data/deepmath-103k/train.parquet", "chat"
    cfg.data.eval = ["/data/eval/aime25.parquet", "/data/eval/aime24.parquet"]
    tr = cfg.train
    tr.steps, tr.prompts_per_step, tr.mini_batches, tr.ppo_epochs = QWEN3[size]["steps"], 128, 4, 1
    tr.lr, tr.min_lr, tr.lr_schedule, tr.warmup_steps = 1e-6, 1e-6, "constant", 0
    tr.weight_decay, tr.grad_clip = 0.1, 1.0
    tr.max_tokens_per_gpu_train = tokens
    tr.max_tokens_per_gpu_logprob = tokens
    tr.logprob_chunk_tokens = 4096
    tr.deterministic = False
    al = cfg.algo
    al.loss.name, al.loss.clip_low, al.loss.clip_high, al.loss.dual_clip_c = "ppo", 0.2, 0.28, 10.0
    al.aggregation = "token-mean"
    cfg.reward.kind, cfg.reward.variant = "math", "dapo"  # DAPO's +1/-1 (verl math_dapo)
    al.kl.estimator = "none"
    al.overlong.enabled, al.overlong.buffer_len, al.overlong.penalty_factor = True, 4096, 1.0
    al.dynamic_sampling.enabled = False
    cfg.checkpoint.every, cfg.checkpoint.keep = 10, 2
    cfg.checkpoint.every_minutes = 60.0  # a crash loses at most an hour (a step is ~20 min)
    cfg.parallel.timeout_minutes = 120.0  # > rank 0's longest rollout / eval (the planner checks)
    cfg.eval.every, cfg.eval.k, cfg.eval.temperature, cfg.eval.top_p = 10, 8, 1.0, 0.7
    cfg.eval.max_new_tokens, cfg.eval.max_prompts = 30000, 30  # AIME 2024 / 2025: 30 problems each
    cfg.logging.tensorboard = True
    return cfg


def with_delta(cfg: Config) -> Config:
    """DelTA on top of DAPO: K = 1, λ range [0.8, 1.2]; the ``v`` cache in bf16 (2d bytes/token)
    so no extra transformer forward is needed (delta.md §9.3)."""
    cfg.credit.methods = ["delta"]
    cfg.credit.delta.K, cfg.credit.delta.lambda_range = 1, (0.8, 1.2)
    cfg.credit.delta.mode, cfg.credit.delta.cache_dtype = "cache", "bfloat16"
    return cfg


def qwen3_delta(size: str, *, nodes: int = 1, fp8: bool = False) -> Config:
    cfg = with_delta(paper_config(size, nodes=nodes, fp8=fp8))
    validate(cfg)
    return cfg


def qwen3_8b(nodes: int = 1, fp8: bool = False) -> Config:
    return qwen3_delta("8b", nodes=nodes, fp8=fp8)


def qwen3_14b(nodes: int = 1, fp8: bool = False) -> Config:
    return qwen3_delta("14b", nodes=nodes, fp8=fp8)


def qwen3_32b(nodes: int = 2, fp8: bool = False) -> Config:
    return qwen3_delta("32b", nodes=nodes, fp8=fp8)


def table3(size: str = "8b", nodes: int = 1, fp8: bool = False) -> dict[str, Config]:
    """The paper's main comparison as one experiment: DAPO, DAPO w/ Forking Tokens (top-20 %
    entropy tokens), SAPO (τ+ 1.0, τ− 1.05), FIPO (decay 32, chunk 128, Future-KL clip 0.2
    high-only, safety 10) and DelTA, all with the shared settings (delta.md §7.1, App. J)."""
    runs = {name: paper_config(size, nodes=nodes, fp8=fp8)
            for name in ("dapo", "dapo-ft", "sapo", "fipo", "delta")}
    runs["dapo-ft"].credit.methods = ["forking"]
    runs["dapo-ft"].credit.forking.rho = 0.2
    runs["sapo"].algo.loss.name = "sapo"
    runs["sapo"].algo.loss.sapo.tau_pos, runs["sapo"].algo.loss.sapo.tau_neg = 1.0, 1.05
    runs["sapo"].algo.aggregation = "auto"  # verl forces seq-mean-token-mean for SAPO
    fipo = runs["fipo"].algo.loss
    fipo.name = "fipo"
    fipo.fipo.decay_rate, fipo.fipo.chunk, fipo.fipo.safety_thresh = 32.0, 128, 10.0
    fipo.fipo.f_range = (1.0, 1.2)  # Future-KL clip 0.2, high side only
    with_delta(runs["delta"])
    for cfg in runs.values():
        cfg.logging.wandb_project = f"delta-table3-qwen3-{size}"
        validate(cfg)
    return {f"qwen3-{size}-{name}": cfg for name, cfg in runs.items()}


RECIPES = {
    "qwen3-8b-delta": qwen3_8b,
    "qwen3-14b-delta": qwen3_14b,
    "qwen3-32b-delta": qwen3_32b,
    "qwen3-8b-delta-fp8": lambda nodes=1: qwen3_8b(nodes, fp8=True),
    "qwen3-14b-delta-fp8": lambda nodes=1: qwen3_14b(nodes, fp8=True),
    "qwen3-32b-delta-fp8": lambda nodes=2: qwen3_32b(nodes, fp8=True),
    "table3-qwen3-8b": lambda nodes=1: table3("8b", nodes),
    "table3-qwen3-14b": lambda nodes=1: table3("14b", nodes),
}
