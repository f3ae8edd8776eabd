"""The planner against published numbers (docs/planner.md, "Check against published configurations")."""

from __future__ import annotations

import pytest

from delta_megatron import planner_model as pm


@pytest.mark.parametrize("dp, per_param", [(1, 18.0), (8, 7.5), (64, 6.1875)])
def test_megatron_distributed_optimizer_bytes_per_param(dp, per_param):
    # Megatron-Core docs, "Distributed Optimizer": bf16 parameters + fp32 gradients use
    # 6 + 12/d bytes per parameter (18 with d = 1)
    state = pm.model_state_bytes(10**6, dp)
    assert sum(state.values()) / 10**6 == pytest.approx(per_param)


def test_zero_paper_figure1_7_5b_on_64_gpus():
    # Rajbhandari et al. 2020 (ZeRO), Fig. 1: Ψ = 7.5B, N_d = 64, K = 12, fp16 grads:
    # baseline (2+2+K)Ψ = 120 GB, P_os (optimizer states sharded) (2+2+K/N_d)Ψ = 31.4 GB
    psi = 7.5e9
    baseline = pm.model_state_bytes(psi, 64, grad_bytes=2, distributed=False)
    sharded = pm.model_state_bytes(psi, 64, grad_bytes=2, distributed=True)
    assert sum(baseline.values()) / 1e9 == pytest.approx(120.0)
    assert round(sum(sharded.values()) / 1e9, 1) == 31.4


def test_vllm_paper_opt_13b_kv_cache_per_token():
    # Kwon et al. 2023 (vLLM / PagedAttention), §3: OPT-13B needs 2 (K, V) x 5120 (hidden) x 40
    # (layers) x 2 (fp16 bytes) = 800 KB of KV cache per token, 1.6 GB for a 2048-token request
    opt13b = pm.Dims(d=5120, layers=40, heads=40, kv_heads=40, head_dim=128, ffn=20480, vocab=50272,
                     tied=True, qk_norm=False, qkv_bias=True)
    assert pm.kv_bytes_per_token(opt13b) == 819200
    assert round(pm.kv_bytes_per_token(opt13b) * 2048 / 2**30, 1) == 1.6  # 800 KB x 2048


def test_qwen3_parameter_counts_match_the_model_cards():
    # Qwen3 model cards: 8.2B, 14.8B, 32.8B parameters (config.json shapes, untied embeddings)
    def qwen3(d, layers, heads, ffn):
        return pm.Dims(d=d, layers=layers, heads=heads, kv_heads=8, head_dim=128, ffn=ffn,
                       vocab=151936, tied=False, qk_norm=True, qkv_bias=False)

    assert round(pm.total_params(qwen3(4096, 36, 32, 12288)) / 1e9, 1) == 8.2
    assert round(pm.total_params(qwen3(5120, 40, 40, 17408)) / 1e9, 1) == 14.8
    assert round(pm.total_params(qwen3(5120, 64, 64, 25600)) / 1e9, 1) == 32.8
