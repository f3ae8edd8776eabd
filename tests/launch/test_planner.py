"""Planner numbers computed by hand for a small model (the arithmetic is in the comments)."""

from __future__ import annotations

import pytest

from delta_megatron import planner_model as pm
from delta_megatron.config import Config, ModelConfig, ParallelConfig
from delta_megatron.planner import Hardware, PlanError, PlanOptions, plan, time_problems

# d=64, 2 layers, 4 heads (hq=64), 2 kv heads (hkv=32), head_dim 16, ffn 128, V=100, untied, qk-norm
TINY = pm.Dims(d=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128, vocab=100, tied=False,
               qk_norm=True, qkv_bias=False)


def test_parameter_counts():
    # q,k,v: 64*(64+2*32) = 8192; o: 64*64 = 4096; SwiGLU: 3*64*128 = 24576
    assert pm.layer_matmul_params(TINY) == 36864
    assert pm.layer_norm_params(TINY) == 2 * 64 + 2 * 16 == 160
    # embedding 6400 + 2 layers * 37024 + final norm 64 + untied head 6400
    assert pm.total_params(TINY) == 86912
    # tp=2, pp=1: 2*(36864/2 + 160) + 100*64/2 (embedding) + 3200 (head) + 64
    assert pm.stage_params(TINY, tp=2, pp=1) == 43648
    # tp=1, pp=2: last stage = 1 layer 37024 + head 6400 + final norm 64
    assert pm.stage_params(TINY, tp=1, pp=2) == 43488
    assert pm.flops_params(TINY) == 2 * 36864 + 6400 == 80128


def test_model_state_matches_megatron_bytes_per_param():
    state = pm.model_state_bytes(43648, dp_cp=4)
    assert state == {"weights": 87296, "grads": 174592, "optimizer": 130944}
    # Megatron docs: bf16 params + fp32 grads with the distributed optimizer = 6 + 12/d bytes/param
    assert sum(state.values()) / 43648 == 6 + 12 / 4
    assert sum(pm.model_state_bytes(1000, 4, distributed=False).values()) == 18 * 1000


def test_activation_bytes():
    # tp=2, SP: norm/linear inputs 4*64/2 = 128; (qk-norm in 96 + q,k,v 128 + attn out 64 + 3*128)/2
    # = 336 -> 464 bf16 elements = 928 B, + fp32 lse 4*4/2 = 8 B
    assert pm.layer_activation_bytes_per_token(TINY, tp=2, sp=True) == 936
    # without SP the 4*d part is replicated on every TP rank: 2*(256 + 336) + 8
    assert pm.layer_activation_bytes_per_token(TINY, tp=2, sp=False) == 1192
    # 10 tokens, 2 layers, one micro-batch in flight
    assert pm.train_activation_bytes(TINY, 10, 2, 1, True, "none", 1) == 936 * 10 * 2
    # full recompute: layer inputs 2*64/2*10 per layer, plus one layer being recomputed
    assert pm.train_activation_bytes(TINY, 10, 2, 1, True, "full", 1) == 1280 + 9360
    # 1F1B with pp=2 on 4 layers would keep 2 micro-batches; interleaving (vpp=2) adds (p-1)/(p*v)
    deep = pm.Dims(**{**TINY.__dict__, "layers": 4})
    assert pm.train_activation_bytes(deep, 10, 2, 2, True, "none", 2, vpp=2) == \
        pytest.approx(936 * 10 * 2 * 2 * 1.25)


def test_kv_and_flops():
    assert pm.kv_bytes_per_token(TINY) == 2 * 2 * 32 * 2 == 256
    # 2N per token + causal attention 2*L*hq*s^2 per sequence
    assert pm.attention_flops_fwd(TINY, 10) == 2 * 2 * 64 * 100
    assert pm.forward_flops(TINY, 10, 10) == 2 * 80128 * 10 + 25600
    assert pm.train_flops(TINY, 10, 10, "none") == 3 * 1628160
    assert pm.train_flops(TINY, 10, 10, "full") == 4 * 1628160
    assert pm.ring_allreduce_seconds(1000, 4, 100) == pytest.approx(2 * 3 / 4 * 10)


def tiny_config(mem_fraction: float) -> Config:
    cfg = Config(model=ModelConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   tie_word_embeddings=False, params_dtype="bfloat16"),
                 parallel=ParallelConfig(tp=2, sequence_parallel=True))
    cfg.rollout.engine, cfg.rollout.n_samples = "sglang", 2
    cfg.rollout.max_prompt_len, cfg.rollout.max_new_tokens = 6, 10
    cfg.rollout.sglang.mem_fraction = mem_fraction
    cfg.train.prompts_per_step, cfg.train.mini_batches = 4, 2
    cfg.train.max_tokens_per_gpu_train = cfg.train.max_tokens_per_gpu_logprob = 16
    cfg.train.logprob_chunk_tokens = 8
    cfg.credit.methods = ["delta"]
    cfg.credit.delta.cache_dtype = "bfloat16"
    return cfg


# 1 MiB "GPUs" (256 KiB reserved), 4 per node, 1 MFLOP/s: numbers stay small enough to check
HW = Hardware(gpu="toy", gpus_per_node=4, hbm_gib=2**-10, reserved_gib=2**-12, bf16_tflops=1e-6,
              fp8_tflops=1e-6, hbm_tbps=1e-6, nvlink_gbps=1e-3, ib_gbps=1e-3, fs_write_gbps=1e-3,
              train_mfu=0.5, forward_mfu=0.5, decode_mbu=0.5)


def test_plan_memory_and_time_by_hand():
    p = plan(tiny_config(0.2), HW, PlanOptions(nodes=1))
    assert p.layout["dp"] == 2 and p.layout["micro_batches"] == 2  # 128 tokens / 2 minis / 2 dp / 16
    weights, grads, optimizer = 87296, 174592, 12 * 43648 / 2  # dp*cp = 2 shards the Adam state
    # SGLang (tp 1): its copy of the weights (2 x 86912 B) and the rest of its 0.2 MiB pool as KV
    engine = {"engine weights": 173824, "engine kv_cache": 0.2 * 2**20 - 173824}
    # colocated (memory.*): the actor keeps only its weights while SGLang generates ...
    assert p.memory["rollout"] == {"weights": weights} | engine
    # ... its whole state while SGLang has released everything; forward work: one layer (936*16) +
    # residual 2*64*16; DelTA cache: 8*10 response tokens / dp 2 / tp 2 (SP-sharded h) x 64 x 2 B
    state = {"weights": weights, "grads": grads, "optimizer": optimizer}
    assert p.memory["logprob"] == state | {"forward work": 14976 + 2048, "logit chunks": 3200,
                                           "delta v cache": 2560}
    assert p.memory["train"] == state | {"activations": 936 * 16 * 2,
                                         "lm head+chunks": 2 * 64 * 16 + 2 * 4 * 8 * 100 / 2}
    # the sync: SGLang's weights are back, the sender holds its stage's weights gathered over TP
    assert p.memory["sync"] == {"weights": weights, "engine weights": 173824, "sync buffers": 2 * 43648 * 2}
    assert p.memory["save"] == {"weights": weights, "optimizer": optimizer, "engine weights": 173824}
    assert p.peak("train") == 558976 and p.peak("logprob") == 546560
    assert p.host == {"optimizer": optimizer}  # pinned, between the sync and the next train phase
    assert p.usable_bytes == 786432 and p.fits
    # old-log-prob pass: 8 x (0.25*6 + 0.5*10) = 52 tokens in sequences of 6:
    # (2*80128*52 + 2*2*64*36*52/6) FLOPs / (4 GPUs x 1e6 x 0.5)
    assert p.time_s["old-logprob pass"] == pytest.approx(8413184 / 2e6)
    assert p.time_s["delta extra fwd"] == 0.0  # cache mode: no extra forward
    assert p.time_s["offload/onload"] == pytest.approx(2 * optimizer / 50e9)  # host_link_gbps 50
    assert p.stages["optimizer step"] == pytest.approx(
        (p.time_s["train fwd+bwd"] + p.time_s["dp grad sync"]) / 2)  # 2 mini-batches x 1 epoch


def test_without_colocation_everything_stays_resident_and_does_not_fit():
    cfg = tiny_config(0.5)
    assert plan(cfg, HW, PlanOptions(nodes=1)).fits  # colocated: 87296 + 0.5 MiB in the rollout
    cfg.memory.colocate = False
    p = plan(cfg, HW, PlanOptions(nodes=1))
    # actor state 523776 B + SGLang pool 0.5 MiB = 1048064 B > 786432 B usable, in every phase
    assert p.peak("rollout") == 523776 + 524288 and not p.fits
    assert p.host == {"delta v cache": 2560}  # auto: the cache moved to the host, still no room
    assert [x.split(":")[0] for x in p.problems] == [f"{ph} phase" for ph in ("rollout", "logprob", "train",
                                                                              "sync", "save")]
    assert p.problems[0].startswith("rollout phase: needs 1023.5 KiB per GPU > usable 768.0 KiB")
    assert "largest: engine kv_cache 342.2 KiB" in p.problems[0]
    with pytest.raises(PlanError, match="rollout phase"):
        p.check()


def test_offloaded_weights_and_a_host_delta_cache_leave_the_gpu():
    cfg = tiny_config(0.2)
    cfg.memory.offload_weights = True
    cfg.credit.delta.cache_device = "host"
    p = plan(cfg, HW, PlanOptions(nodes=1))
    assert "weights" not in p.memory["rollout"] and "delta v cache" not in p.memory["logprob"]
    assert p.memory["sync"]["weights"] == 87296  # the sync reads them: offloaded only after it
    assert p.host == {"optimizer": 12 * 43648 / 2, "weights": 87296, "delta v cache": 2560}
    # the cache goes out during the log-prob pass (overlapped) and comes back for K+2 = 3 stages
    assert p.time_s["delta host cache"] == pytest.approx(3 * 2560 / 50e9)


def test_auto_cache_device_picks_what_fits():
    cfg = tiny_config(0.2)
    assert plan(cfg, HW, PlanOptions()).choices["credit.delta.cache_device"] == "gpu"
    cfg.train.max_tokens_per_gpu_logprob = 242  # forward work 1064 B x 242: 2432 B short of the cache
    p = plan(cfg, HW, PlanOptions())
    assert p.choices["credit.delta.cache_device"] == "host" and "delta v cache" not in p.memory["logprob"]
    assert p.peak("logprob") + 2560 > p.usable_bytes >= p.peak("logprob")
    cfg.credit.delta.cache_device = "gpu"  # forced: the plan says it does not fit
    assert any(x.startswith("logprob phase") for x in plan(cfg, HW, PlanOptions()).problems)


def test_pinned_host_memory_is_checked():
    cfg = tiny_config(0.2)
    hw = Hardware(**{**HW.__dict__, "host_mem_gib": 2**-10})  # 1 MiB of host memory per node
    cfg.memory.offload_weights = True
    p = plan(cfg, hw, PlanOptions())  # (261888 + 87296) B x 4 GPUs = 1.3 MiB > 80 % of 1 MiB
    assert "host memory: 1.3 MiB pinned per node (optimizer, weights) > 80% of 1.0 MiB; offload less " \
           "(memory.*) or keep credit.delta.cache_device on the gpu" in p.problems


def test_plan_rejects_bad_layouts():
    cfg = tiny_config(0.2)
    cfg.parallel.tp, cfg.parallel.sequence_parallel = 3, False
    cfg.rollout.max_new_tokens = 40  # 46-token sequences > 16 tokens per GPU
    p = plan(cfg, HW, PlanOptions(nodes=1))
    assert "layout: tp*pp*cp = 3 does not divide 4 GPUs (1 nodes x 4)" in p.problems
    assert "layout: tp=3 must divide num_attention_heads=4 and num_key_value_heads=2" in p.problems
    assert any(s.startswith("train micro-batch: one sequence of 46 tokens needs 46 tokens per GPU")
               for s in p.problems)


def test_recompute_and_delta_modes_change_the_plan():
    cfg = tiny_config(0.2)
    kept, layer = 2 * 64 / 2 * 16, 936 * 16  # a layer's input (SP-sharded), a layer's activations
    full = plan(cfg, HW, PlanOptions(recompute="full"))
    assert full.memory["train"]["activations"] == kept * 2 + layer
    assert full.layout["recompute"] == "full"
    cfg.train.recompute_granularity, cfg.train.recompute_method = "full", "block"
    block = plan(cfg, HW, PlanOptions())  # from the config: the first layer recomputed, the second kept
    assert block.memory["train"]["activations"] == kept + layer + layer
    cfg.train.recompute_granularity, cfg.train.recompute_modules = "selective", ["mlp"]
    selective = plan(cfg, HW, PlanOptions())  # the SwiGLU outputs (3 x 128 / 2 per token) not kept
    assert selective.memory["train"]["activations"] == (layer - 2 * 3 * 128 / 2 * 16) * 2
    none = plan(tiny_config(0.2), HW, PlanOptions())
    assert none.time_s["train fwd+bwd"] < selective.time_s["train fwd+bwd"] < full.time_s["train fwd+bwd"]
    assert full.time_s["train fwd+bwd"] == pytest.approx(none.time_s["train fwd+bwd"] * 4 / 3)
    cfg = tiny_config(0.2)
    cfg.credit.delta.mode = "recompute"  # K + 2 = 3 extra forwards, no cache
    p = plan(cfg, HW, PlanOptions())
    assert "delta v cache" not in p.memory["logprob"]
    assert p.time_s["delta extra fwd"] == pytest.approx(3 * p.time_s["old-logprob pass"])


def test_collective_timeout_must_outlast_rank_zero_alone():
    cfg = tiny_config(0.2)
    assert plan(cfg, HW, PlanOptions()).fits  # 30 minutes
    cfg.parallel.timeout_minutes = 0.01  # 0.6 s: less than the toy rollout with every response at max length
    problems = plan(cfg, HW, PlanOptions()).problems
    assert len(problems) == 1 and problems[0].startswith(
        "parallel.timeout_minutes: 0.01 min is shorter than the longest stage only rank 0 works in "
        "(rollout (all responses at max length):"), problems


def test_time_limit_and_signal_lead_are_checked_against_the_plan():
    p = plan(tiny_config(0.2), HW, PlanOptions())
    name, longest = max(p.stages.items(), key=lambda kv: kv[1])
    step = sum(p.time_s.values())
    margin = p.save_s + longest
    assert time_problems(p, startup_s=10, time_limit_s=10 + step + margin, signal_lead_s=margin) == []
    late, short = time_problems(p, startup_s=10, time_limit_s=10 + step + margin - 1, signal_lead_s=margin - 1)
    assert late.startswith(f"signal lead: {margin - 1:.0f} s before the time limit < save") and name in late
    assert short.startswith("time limit:") and "could not checkpoint a finished step" in short
