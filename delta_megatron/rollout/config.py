"""The ``rollout`` section (and its ``sglang`` sub-section): sampling and engine settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from delta_megatron.utils.configs import Section, fail, option


@dataclass
class SGLangConfig(Section):
    """SGLang servers + router (GPU extra)."""

    num_servers: int = option(1, "SGLang servers the trainer starts (colocated on the actor GPUs)", ge=1)
    tp: int = option(1, "tensor-parallel size of each SGLang server", ge=1)
    mem_fraction: float = option(0.7, "GPU memory fraction each server takes (weights + KV cache)",
                                 gt=0, le=1)
    port_base: int = option(30000, "port of server 0 (server i listens on port_base + i)", ge=1, le=65535)
    router_port: int = option(29000, "port of the SGLang router", ge=1, le=65535)
    request_timeout_s: float = option(600.0, "HTTP timeout of one attempt (seconds); a call gives up after "
                                             "request_timeout_s × (max_retries + 1) + backoff", gt=0)
    max_retries: int = option(3, "retries of a failed or timed-out request", ge=0)
    health_interval_s: float = option(10.0, "seconds between /health probes of every server during "
                                            "generation; a dead server is reported within it", gt=0)
    max_concurrency: int = option(256, "generation requests in flight at once", ge=1)
    weight_sync: Literal["ipc", "nccl", "disk"] = option("ipc", "how new weights reach the servers")
    sync_bucket_mb: int = option(512, "tensor bucket size of one weight-sync push (MiB)", ge=1)
    check_weights: bool = option(False, "after each sync, compare sampled server weights with the actor's")
    memory_saver: bool = option(True, "start servers with --enable-memory-saver, so a colocated run can "
                                      "release and resume their weights and KV pool (memory.colocate)")
    extra_args: list[str] = option(doc="extra command-line arguments of sglang.launch_server",
                                   default_factory=list)


@dataclass
class RolloutConfig(Section):
    engine: Literal["embedded", "sglang"] = option("embedded", "rollout engine: embedded (CPU/HF) or sglang")
    n_samples: int = option(8, "responses sampled per prompt (the group size)", ge=1)
    temperature: float = option(1.0, "sampling temperature (log-probs are taken at it too)", gt=0)
    top_p: float = option(1.0, "nucleus sampling mass; 1 = off", gt=0, le=1)
    top_k: int = option(-1, "top-k sampling; -1 = off", ge=-1)
    max_new_tokens: int = option(32, "response budget in tokens", ge=1)
    max_prompt_len: int = option(64, "longest prompt in tokens (template included); longer ones are "
                                     "handled by long_prompts", ge=1)
    long_prompts: Literal["drop", "fail"] = option(
        "drop", "prompts over max_prompt_len: drop (counted, logged) or fail naming the file and row")
    batch_size: int = option(512, "sequences the embedded engine generates together", ge=1)
    sglang: SGLangConfig = option(doc="SGLang servers and router", default_factory=SGLangConfig)

    def validate(self) -> None:
        if self.top_k == 0:
            fail("top_k", 0, "-1 (off) or >= 1")
