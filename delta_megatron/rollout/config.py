"""The ``rollout`` section (and its ``sglang`` sub-section): sampling and engine settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from delta_megatron.utils.configs import check_range, fail


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
