"""ModelConfig <-> transformers configs: round trips per family, and rejected combinations name the
field instead of silently building an HF model that differs from the actor's."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from delta_megatron.config import ModelConfig
from delta_megatron.models.hf_config import build_hf_model, from_hf_config, load_model_config, to_hf_config
from delta_megatron.utils.configs import ConfigError

FAMILIES = [
    ModelConfig(arch="qwen3", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=1e6,
                tie_word_embeddings=True, rms_norm_eps=1e-5),
    ModelConfig(arch="qwen2", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False,
                params_dtype="bfloat16"),
    ModelConfig(arch="llama", vocab_size=70, hidden_size=32, intermediate_size=40, num_layers=2,
                num_attention_heads=8, num_key_value_heads=4, rope_theta=5e5,
                tie_word_embeddings=False),
]


def _comparable(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("hf_path")
    d["head_dim"] = cfg.kv_channels
    d["qk_norm"], d["attention_bias"] = cfg.use_qk_norm, cfg.use_qkv_bias
    return d


@pytest.mark.parametrize("cfg", FAMILIES, ids=lambda c: c.arch)
def test_roundtrip_through_hf_config_and_config_json(cfg, tmp_path):
    hf = to_hf_config(cfg)
    assert hf.model_type == cfg.arch
    assert _comparable(from_hf_config(hf)) == _comparable(cfg)
    hf.save_pretrained(str(tmp_path))
    loaded = load_model_config(tmp_path)
    assert loaded.hf_path == str(tmp_path) and _comparable(loaded) == _comparable(cfg)


@pytest.mark.parametrize("cfg", FAMILIES, ids=lambda c: c.arch)
def test_tiny_hf_model_has_the_configured_shapes(cfg):
    model = build_hf_model(cfg, seed=0)
    sd = model.state_dict()
    hd = cfg.kv_channels
    assert sd["model.layers.0.self_attn.q_proj.weight"].shape == (cfg.num_attention_heads * hd,
                                                                  cfg.hidden_size)
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (cfg.num_key_value_heads * hd,
                                                                  cfg.hidden_size)
    assert ("model.layers.0.self_attn.q_norm.weight" in sd) == cfg.use_qk_norm
    assert ("model.layers.0.self_attn.q_proj.bias" in sd) == cfg.use_qkv_bias
    assert "model.layers.0.self_attn.o_proj.bias" not in sd
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == cfg.tie_word_embeddings
    assert next(model.parameters()).dtype == {"float32": torch.float32,
                                              "bfloat16": torch.bfloat16}[cfg.params_dtype]


@pytest.mark.parametrize("changes,field", [
    (dict(arch="llama", qk_norm=True), "model.qk_norm"),
    (dict(arch="qwen3", qk_norm=False), "model.qk_norm"),
    (dict(arch="llama", attention_bias=True), "model.attention_bias"),
    (dict(arch="qwen2", attention_bias=False), "model.attention_bias"),
    (dict(arch="qwen2", head_dim=16), "model.head_dim"),
])
def test_unrepresentable_configs_name_the_field(changes, field):
    cfg = dataclasses.replace(FAMILIES[0], **changes)
    with pytest.raises(ConfigError) as err:
        to_hf_config(cfg)
    assert err.value.path == field


def test_rejects_unsupported_hf_models():
    with pytest.raises(ConfigError) as err:
        from_hf_config({"model_type": "mistral"})
    assert err.value.path == "model_type"
    d = to_hf_config(FAMILIES[2]).to_dict()
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    with pytest.raises(ConfigError):
        from_hf_config(d)
    old = dict(d, rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "linear", "factor": 2})
    with pytest.raises(ConfigError):  # transformers 4.x spelling
        from_hf_config(old)
    assert from_hf_config(dict(old, rope_scaling=None)).rope_theta == 1e4
    with pytest.raises(ConfigError) as err:
        from_hf_config(dict(to_hf_config(FAMILIES[1]).to_dict(), use_sliding_window=True))
    assert err.value.path == "use_sliding_window"
