"""The memory ledger: bytes per GPU in every phase of a step, one model for the planner and the code.

Phases follow the lifecycle (``lifecycle.py``): ``rollout`` (the engine generates), ``logprob`` and
``train`` (the old-log-prob pass and the PPO updates, both in the lifecycle's train phase),
``sync`` (weights to the engine) and ``save`` (a checkpoint taken from the rollout phase). Each phase
holds

* the *state* the lifecycle keeps on the device there — the actor's ``weights``, ``grads``,
  ``optimizer`` and the engine's ``engine weights`` / ``engine kv_cache`` — read from
  ``lifecycle.resident(cfg.memory)``, i.e. from the same move table the trainer executes, and
* the phase's *work*: activations and LM-head chunks (train), forward work, logit chunks and the DelTA
  ``v`` cache when it stays on the GPU (logprob), the gathered weights being sent (sync).

Sizes are the closed forms of :mod:`planner_model` for the largest pipeline stage (and rank 0, which
also holds the embedded engine). The trainer logs each phase's entry when it enters the phase, next
to what it measures, so "fits" in ``delta-megatron plan`` means what the code does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from delta_megatron import planner_model as pm
from delta_megatron.lifecycle import resident

PHASES = ("rollout", "logprob", "train", "sync", "save")
LIFECYCLE_PHASE = {"rollout": "rollout", "logprob": "train", "train": "train", "sync": "sync", "save": "save"}
STATE = ("weights", "grads", "optimizer", "fp8 weights", "engine weights", "engine kv_cache")
HOST_FRACTION = 0.8  # of a node's host memory the pinned buffers may take (page cache, workers, ...)


@dataclass
class Ledger:
    """``phases[phase][component]`` bytes per GPU; ``host[component]`` pinned host bytes per GPU;
    ``choices`` the values ``auto`` settings resolve to; ``layout`` the numbers behind them."""

    phases: dict[str, dict[str, float]]
    host: dict[str, float]
    choices: dict[str, str] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)

    def total(self, phase: str) -> float:
        return sum(self.phases[phase].values())

    def state(self, phase: str) -> set[str]:
        """The state components the phase holds (what the lifecycle keeps resident)."""
        return {k for k in self.phases[phase] if k in STATE}


def dims(cfg) -> pm.Dims:
    m = cfg.model
    tp = cfg.parallel.tp
    return pm.Dims(d=m.hidden_size, layers=m.num_layers, heads=m.num_attention_heads,
                   kv_heads=m.num_key_value_heads, head_dim=m.kv_channels, ffn=m.intermediate_size,
                   vocab=-(-m.vocab_size // tp) * tp, tied=m.tie_word_embeddings,
                   qk_norm=m.use_qk_norm, qkv_bias=m.use_qkv_bias)


def weight_bytes(cfg) -> int:
    return pm.BF16 if cfg.model.params_dtype in ("bfloat16", "float16") else pm.FP32


def memory_ledger(cfg, *, gpus: int, hbm_bytes: float, usable_bytes: float | None = None,
                  rollout_nodes: int = 0, grad_bytes: int = pm.FP32) -> Ledger:
    """The ledger of ``cfg`` on ``gpus`` actor GPUs of ``hbm_bytes`` each (SGLang's pool is a fraction
    of it). ``usable_bytes`` resolves ``credit.delta.cache_device: auto`` (the GPU when the logprob
    phase fits there, else the host; without it: the GPU). ``rollout_nodes`` > 0: SGLang has GPUs
    of its own, and ``rollout`` is the phase of those GPUs (its pool alone)."""
    par, ro, tr = cfg.parallel, cfg.rollout, cfg.train
    m = dims(cfg)
    tp, pp, cp, sp = par.tp, par.pp, par.cp, par.sequence_parallel
    dp = max(1, gpus // (tp * pp * cp))
    wbytes = weight_bytes(cfg)

    # ---- the actor's state (largest stage)
    p_local = pm.stage_params(m, tp, pp)
    actor = pm.model_state_bytes(p_local, dp * cp, grad_bytes=grad_bytes, distributed=par.distributed_optimizer,
                                 weight_bytes=wbytes)
    if par.fp8 != "none":  # TE keeps an fp8 copy + transpose of every linear weight
        actor["fp8 weights"] = 2 * m.layers // pp * pm.layer_matmul_params(m) // tp

    # ---- the engine's state (per GPU; the embedded engine lives on rank 0's device)
    responses = tr.prompts_per_step * ro.n_samples
    seq_max = ro.max_prompt_len + ro.max_new_tokens
    kvb = pm.kv_bytes_per_token(m)
    weights_total = wbytes * pm.total_params(m)
    if ro.engine == "sglang":
        pool = ro.sglang.mem_fraction * hbm_bytes  # SGLang's static pool: its weights + KV cache
        engine = {"engine weights": weights_total / ro.sglang.tp}
        engine["engine kv_cache"] = max(pool - engine["engine weights"], 0.0)
    else:
        batch = min(ro.batch_size, responses)
        engine = {"engine weights": float(weights_total), "engine kv_cache": float(kvb * seq_max * batch)}

    # ---- each phase's work
    t_train, t_lp, chunk = tr.max_tokens_per_gpu_train, tr.max_tokens_per_gpu_logprob, tr.logprob_chunk_tokens
    tokens_max = responses * seq_max
    n_micro = max(1, pm.ceil_div(int(tokens_max / tr.mini_batches / dp), t_train * cp))
    act = pm.train_activation_bytes(m, t_train, tp, pp, sp, tr.recompute_granularity, min(pp, n_micro),
                                    par.vpp, method=tr.recompute_method, num_layers=tr.recompute_num_layers,
                                    modules=tuple(tr.recompute_modules))
    work = {
        "rollout": {},
        "logprob": {"forward work": pm.forward_working_bytes(m, t_lp, tp, sp),
                    "logit chunks": 2 * pm.FP32 * min(chunk, t_lp) * m.vocab / tp},
        "train": {"activations": act, "lm head+chunks": pm.lm_head_bytes(m, t_train, chunk, tp)},
        # the sender gathers its stage's weights over TP into HF tensors before the update
        "sync": {"sync buffers": float(wbytes * p_local * tp)},
        "save": {},
    }
    dcfg = cfg.credit.delta
    cache = 0.0
    if "delta" in cfg.credit.methods and dcfg.mode == "cache":
        resp_local = responses * ro.max_new_tokens / (dp * cp) / (tp if sp else 1)
        cache = resp_local * m.d * (pm.BF16 if dcfg.cache_dtype == "bfloat16" else pm.FP32)

    # ---- residency from the lifecycle's move table
    held = resident(cfg.memory)
    state = actor | engine
    phases = {}
    for phase in PHASES:
        keep = held[LIFECYCLE_PHASE[phase]] | ({"fp8 weights"} if "weights" in held[LIFECYCLE_PHASE[phase]]
                                                else set())
        if rollout_nodes:  # the engine is not on these GPUs
            keep -= {"engine weights", "engine kv_cache"}
        phases[phase] = {k: v for k, v in state.items() if k in keep} | work[phase]
    if rollout_nodes:
        phases["rollout"] = dict(engine)  # a GPU of the SGLang nodes
    choices = {}
    if cache:
        place = dcfg.cache_device
        if place == "auto":
            fits = usable_bytes is None or sum(phases["logprob"].values()) + cache <= usable_bytes
            place = "gpu" if fits else "host"
            choices["credit.delta.cache_device"] = place
        if place == "gpu":
            phases["logprob"]["delta v cache"] = cache

    # ---- pinned host memory per GPU: offloaded state and its reusable buffers, a host v cache
    host = {}
    if cfg.memory.colocate and cfg.memory.offload_optimizer:
        host["optimizer"] = actor["optimizer"]
    if cfg.memory.colocate and cfg.memory.offload_weights:
        host["weights"] = actor["weights"]
    if cache and "delta v cache" not in phases["logprob"]:
        host["delta v cache"] = cache
    if cfg.algo.kl.estimator != "none" and cfg.algo.kl.reference_offload:
        host["kl reference"] = float(wbytes * p_local)  # the initial policy, for the KL loss
    layout = dict(dp=dp, micro_batches=n_micro, stage_params=p_local, responses=responses, seq_max=seq_max)
    return Ledger(phases, host, choices, layout)
