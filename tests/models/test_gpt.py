"""Model construction: the TransformerConfig each family maps to, layer-spec resolution with errors
that name the field, and the CPU shim (in a subprocess: it changes process-global state)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from delta_megatron.config import ModelConfig, ParallelConfig
from delta_megatron.models.gpt import padded_vocab_size, resolve_layer_spec, te_available, transformer_config
from delta_megatron.utils.configs import ConfigError

REPO = Path(__file__).resolve().parents[2]
QWEN3 = ModelConfig(arch="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6,
                    rms_norm_eps=1e-5, params_dtype="bfloat16")


def test_transformer_config_maps_every_field():
    tc = transformer_config(QWEN3, ParallelConfig(tp=2, pp=2))
    assert (tc.num_layers, tc.hidden_size, tc.ffn_hidden_size) == (4, 32, 48)
    assert (tc.num_attention_heads, tc.num_query_groups, tc.kv_channels) == (4, 2, 16)
    assert tc.normalization == "RMSNorm" and tc.layernorm_epsilon == 1e-5
    assert tc.gated_linear_unit and tc.activation_func is F.silu
    assert not tc.add_bias_linear and not tc.add_qkv_bias and tc.qk_layernorm
    assert tc.params_dtype == torch.bfloat16 and tc.bf16
    assert (tc.tensor_model_parallel_size, tc.pipeline_model_parallel_size) == (2, 2)
    qwen2 = ModelConfig(arch="qwen2", num_attention_heads=4, num_key_value_heads=2)
    tc2 = transformer_config(qwen2, ParallelConfig())
    assert tc2.add_qkv_bias and not tc2.qk_layernorm and tc2.params_dtype == torch.float32


def test_layout_errors_name_the_field():
    with pytest.raises(ConfigError) as err:
        transformer_config(QWEN3, ParallelConfig(tp=4))  # 2 KV heads cannot split over 4 ranks
    assert err.value.path == "parallel.tp"
    with pytest.raises(ConfigError) as err:
        transformer_config(QWEN3, ParallelConfig(pp=3))
    assert err.value.path == "parallel.pp"


@pytest.mark.skipif(te_available(), reason="checks the errors raised without Transformer Engine")
@pytest.mark.parametrize("parallel,field", [
    (ParallelConfig(cp=2), "parallel.cp"),
    (ParallelConfig(fp8="delayed"), "parallel.fp8"),
    (ParallelConfig(layer_spec="te"), "parallel.layer_spec"),
    (ParallelConfig(tp=2, sequence_parallel=True), "parallel.sequence_parallel"),
])
def test_te_only_features_fail_clearly_without_te(parallel, field):
    with pytest.raises(ConfigError) as err:
        resolve_layer_spec(parallel)
    assert err.value.path == field


def test_auto_spec_is_local_without_te():
    assert resolve_layer_spec(ParallelConfig()) == ("te" if te_available() else "local")


def test_padded_vocab():
    assert padded_vocab_size(ModelConfig(vocab_size=151936), 8) == 151936
    assert padded_vocab_size(ModelConfig(vocab_size=61), 2) == 62


_SHIM = textwrap.dedent("""
    import torch
    from delta_megatron.utils import cpu_shim
    from megatron.core.tensor_parallel import random as mg_random
    assert cpu_shim.apply() and cpu_shim.apply()  # idempotent
    cpu = torch.device("cpu")
    assert torch.zeros(2, device="cuda").device == cpu
    assert torch.empty(2, device=torch.cuda.current_device()).device == cpu
    x = torch.ones(3)
    assert x.cuda() is x and x.to("cuda").device == cpu and x.to("cuda", torch.float64).dtype == torch.float64
    torch.cuda.synchronize()
    torch.cuda.manual_seed(5); a = torch.rand(4)
    state = torch.cuda.get_rng_state(); b = torch.rand(4)
    mg_random._set_cuda_rng_state(state); assert torch.equal(torch.rand(4), b)
    assert torch.equal(mg_random._get_cuda_rng_state(), torch.get_rng_state())
    torch.manual_seed(5); assert torch.equal(torch.rand(4), a)
    print("ok")
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the shim is a no-op with CUDA")
def test_cpu_shim_redirects_cuda_calls():
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", _SHIM], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
