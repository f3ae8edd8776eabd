"""The ``model`` section: an HF-style decoder config, read by the actor's model builder, the
converter and the embedded engine's HF model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from delta_megatron.utils.configs import check_range, fail


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
