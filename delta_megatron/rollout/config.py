"""The ``rollout`` section (and its ``sglang`` sub-section): sampling, engine and placement settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from delta_megatron.utils.configs import Section, fail, option


@dataclass
class SGLangConfig(Section):
    """SGLang servers + router (GPU extra). Where they run follows ``rollout.placement``
    (:func:`delta_megatron.topology.place`)."""

    servers_per_node: int = option(0, "SGLang servers on each serving node; 0: fill it (GPUs per node // tp)",
                                   ge=0)
    tp: int = option(1, "GPUs per SGLang server (--tp-size), all on one node", ge=1)
    dp_attention: int = option(1, "SGLang DP-attention size (--dp-size with --enable-dp-attention); "
                                  "1: off; must divide tp", ge=1)
    mem_fraction: float = option(0.7, "GPU memory fraction each server takes (weights + KV cache)",
                                 gt=0, le=1)
    port_base: int = option(30000, "HTTP port of a node's first server", ge=1, le=65535)
    port_stride: int = option(10, "port distance between a node's servers (SGLang opens more ports "
                                  "next to its HTTP port)", ge=1)
    router_port: int = option(29000, "HTTP port of sglang_router", ge=1, le=65535)
    sync_port_base: int = option(29100, "TCP port of pipeline stage s's weight-update group: base + s "
                                        "(distributed sync), on the stage sender's node", ge=1, le=65535)
    request_timeout_s: float = option(600.0, "HTTP timeout of one attempt (seconds); a call gives up after "
                                             "request_timeout_s × (max_retries + 1) + backoff", gt=0)
    max_retries: int = option(3, "retries of a failed or timed-out request", ge=0)
    health_interval_s: float = option(10.0, "seconds between /health probes of every server during "
                                            "generation; a dead server is reported within it", gt=0)
    max_concurrency: int = option(256, "generation requests in flight at once", ge=1)
    weight_sync: Literal["auto", "ipc", "distributed", "disk"] = option(
        "auto", "auto: ipc when colocated, distributed (NCCL; gloo on CPU) when disaggregated; "
                "disk: safetensors through sync_dir")
    sync_bucket_mb: int = option(512, "weights move in buckets of this many MiB (peak extra memory "
                                      "of a sender ~2 buckets)", ge=1)
    sync_dir: str | None = option(None, "disk sync directory every server can read; "
                                        "null: <logging.dir>/weight_sync")
    check_weights: bool = option(False, "after each sync, compare sampled server weights with the actor's")
    memory_saver: bool = option(True, "start servers with --enable-memory-saver, so a colocated run can "
                                      "release and resume their weights and KV pool (memory.colocate)")
    startup_timeout_s: float = option(900.0, "seconds a server or the router may take to answer /health", gt=0)
    server_module: str = option("sglang.launch_server", "python -m MODULE starts one server with SGLang's "
                                                        "CLI (tests: tests.doubles.fake_sglang)")
    extra_args: list[str] = option(doc="extra command-line arguments of sglang.launch_server",
                                   default_factory=list)

    def validate(self) -> None:
        if self.tp % self.dp_attention:
            fail("dp_attention", self.dp_attention, f"must divide tp={self.tp}")


@dataclass
class RolloutConfig(Section):
    engine: Literal["embedded", "sglang"] = option("embedded", "rollout engine: embedded (CPU/HF) or sglang")
    placement: Literal["colocated", "disaggregated"] = option(
        "colocated", "colocated: SGLang servers share the actor's nodes and GPUs; disaggregated: "
                     "the last rollout.nodes nodes only serve")
    nodes: int = option(0, "nodes that only serve rollouts (placement: disaggregated); 0 when colocated",
                        ge=0)
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
        if self.placement == "colocated" and self.nodes:
            fail("nodes", self.nodes, "must be 0 with placement: colocated (servers share the actor's nodes)")
        if self.placement == "disaggregated" and self.nodes < 1:
            fail("nodes", self.nodes, "placement: disaggregated needs >= 1 rollout node")
        if self.placement == "disaggregated" and self.engine != "sglang":
            fail("placement", self.placement, "disaggregated needs engine: sglang (the embedded engine "
                                              "lives in the trainer's rank 0)")
        if self.sglang.weight_sync == "ipc" and self.placement == "disaggregated":
            fail("sglang.weight_sync", "ipc", "ipc needs placement: colocated (CUDA IPC stays on one node)")
