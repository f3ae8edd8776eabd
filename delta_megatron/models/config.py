"""The ``model`` section: an HF-style decoder config, read by the actor's model builder, the
converter and the embedded engine's HF model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from delta_megatron.utils.configs import Section, fail, option


@dataclass
class ModelConfig(Section):
    """An HF-style decoder config (Qwen3 / Qwen2 / Llama). The actor builds a megatron-core GPTModel
    from it and the embedded engine an HF model, so both sides agree on every shape."""

    arch: Literal["qwen3", "qwen2", "llama"] = option("qwen3", "model family (HF class and defaults)")
    vocab_size: int = option(32, "vocabulary rows; at least the tokenizer's size", ge=1)
    hidden_size: int = option(128, "model width d", ge=1)
    intermediate_size: int = option(384, "MLP hidden width (SwiGLU)", ge=1)
    num_layers: int = option(4, "transformer layers", ge=1)
    num_attention_heads: int = option(4, "query heads", ge=1)
    num_key_value_heads: int = option(2, "key/value heads (GQA groups); divides num_attention_heads", ge=1)
    head_dim: int | None = option(None, "per-head width; null = hidden_size // num_attention_heads", ge=1)
    rope_theta: float = option(10000.0, "RoPE base frequency", gt=0)
    rms_norm_eps: float = option(1e-6, "RMSNorm epsilon", gt=0)
    max_position_embeddings: int = option(2048, "longest sequence (prompt + response) the model takes",
                                          ge=1)
    tie_word_embeddings: bool = option(True, "share the input embedding and the output layer")
    qk_norm: bool | None = option(None, "RMSNorm on queries and keys; null = true for qwen3 only")
    attention_bias: bool | None = option(None, "q/k/v biases; null = true for qwen2 only")
    params_dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "weight dtype")
    init_std: float = option(0.02, "std of the random init (without hf_path)", ge=0)
    hf_path: str | None = option(None, "HF checkpoint directory to load weights from; null = random init")

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
        if self.num_attention_heads % self.num_key_value_heads:
            fail("num_key_value_heads", self.num_key_value_heads,
                 f"must divide num_attention_heads={self.num_attention_heads}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            fail("hidden_size", self.hidden_size,
                 f"must be divisible by num_attention_heads={self.num_attention_heads} (or set head_dim)")
        if self.hf_path == "":
            fail("hf_path", "", "an HF checkpoint directory or null")
