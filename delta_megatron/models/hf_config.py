"""ModelConfig <-> transformers configs (Qwen3Config / Qwen2Config / LlamaConfig), tiny HF models.

The actor builds a megatron GPTModel and the embedded engine / HF export an HF model from the *same*
ModelConfig; this module is the translation, with the combinations HF cannot express rejected by
name (e.g. QK-norm on Llama) instead of silently producing a model that differs from the actor's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from delta_megatron.models.config import ModelConfig
from delta_megatron.utils.configs import ConfigError

__all__ = ["to_hf_config", "from_hf_config", "load_model_config", "build_hf_model",
           "check_hf_compatible", "torch_dtype"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(cfg: ModelConfig) -> torch.dtype:
    return _DTYPES[cfg.params_dtype]


def check_hf_compatible(cfg: ModelConfig) -> None:
    """Raise ConfigError (naming the field) for what the HF class of ``cfg.arch`` cannot represent."""
    if cfg.use_qk_norm != (cfg.arch == "qwen3"):
        raise ConfigError("model.qk_norm", cfg.qk_norm,
                          f"HF {cfg.arch} {'always has' if cfg.arch == 'qwen3' else 'has no'} QK-norm")
    if cfg.use_qkv_bias != (cfg.arch == "qwen2"):
        raise ConfigError("model.attention_bias", cfg.attention_bias,
                          "only qwen2 has q/k/v biases (HF llama/qwen3 attention_bias also adds an "
                          "o_proj bias, which megatron's add_qkv_bias does not)")
    if cfg.arch == "qwen2" and cfg.head_dim not in (None, cfg.hidden_size // cfg.num_attention_heads):
        raise ConfigError("model.head_dim", cfg.head_dim,
                          "HF qwen2 has head_dim = hidden_size // num_attention_heads")


def to_hf_config(cfg: ModelConfig, **extra):
    """The transformers config for ``cfg`` (``extra`` e.g. bos/eos/pad token ids)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    check_hf_compatible(cfg)
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
        hidden_act="silu", max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.init_std, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        dtype=cfg.params_dtype,
    )
    if cfg.arch == "qwen3":
        hf = Qwen3Config(head_dim=cfg.kv_channels, attention_bias=False, **common, **extra)
    elif cfg.arch == "qwen2":
        hf = Qwen2Config(**common, **extra)
    else:
        hf = LlamaConfig(head_dim=cfg.kv_channels, attention_bias=False, mlp_bias=False,
                         **common, **extra)
    hf.architectures = [{"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM",
                         "llama": "LlamaForCausalLM"}[cfg.arch]]
    return hf


def _rope_theta(d: dict) -> float:
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}  # transformers 5 / 4.x
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", None):
        raise ConfigError("rope_parameters.rope_type", kind, "only default RoPE is supported")
    return float(params.get("rope_theta", d.get("rope_theta", 10000.0)))


def from_hf_config(hf, **overrides) -> ModelConfig:
    """ModelConfig from a transformers config (object or dict). ``overrides`` set ModelConfig fields."""
    d = hf if isinstance(hf, dict) else hf.to_dict()
    arch = d.get("model_type")
    if arch not in ("qwen3", "qwen2", "llama"):
        raise ConfigError("model_type", arch, "supported: qwen3, qwen2, llama")
    heads = d["num_attention_heads"]
    head_dim = d.get("head_dim")
    dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
    dtype = str(dtype).replace("torch.", "")
    cfg = ModelConfig(
        arch=arch, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=d.get("num_key_value_heads") or heads,
        head_dim=None if head_dim in (None, d["hidden_size"] // heads) else head_dim,
        rope_theta=_rope_theta(d), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        params_dtype=dtype if dtype in _DTYPES else "float32",
        init_std=d.get("initializer_range", 0.02),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    if d.get("use_sliding_window"):
        raise ConfigError("use_sliding_window", True, "sliding-window attention is not supported")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise ConfigError("attention_bias", True, "o_proj / MLP biases are not supported")
    check_hf_compatible(cfg)
    return cfg


def load_model_config(path: str | Path, **overrides) -> ModelConfig:
    """ModelConfig from an HF checkpoint directory (its config.json); ``hf_path`` is set to it."""
    d = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    return from_hf_config(d, hf_path=str(path), **overrides)


def build_hf_model(cfg: ModelConfig, seed: int | None = 0, **extra):
    """A randomly initialised HF causal LM for ``cfg`` (tiny models for tests and the CPU demo)."""
    from transformers import AutoModelForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(to_hf_config(cfg, **extra), dtype=torch_dtype(cfg))
    return model.eval()
