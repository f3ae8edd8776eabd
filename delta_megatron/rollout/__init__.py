"""Rollout engines behind one protocol: embedded (HF, in-process, the CPU default) and SGLang.

See docs/rollout.md. The trainer uses :func:`make_engine` and the :class:`RolloutEngine` protocol;
SGLang-only pieces (server launch, weight-sync strategies) are imported lazily so the CPU path never
needs them.
"""

from __future__ import annotations

from delta_megatron.rollout.engine import (
    FinishReason,
    GenerateRequest,
    PartialRolloutBuffer,
    RequestFailed,
    RolloutEngine,
    RolloutError,
    Sample,
    SamplingParams,
    WeightSyncError,
    weight_update_window,
)

__all__ = [
    "FinishReason", "GenerateRequest", "PartialRolloutBuffer", "RequestFailed", "RolloutEngine",
    "RolloutError", "Sample", "SamplingParams", "WeightSyncError", "weight_update_window",
    "make_engine",
]


def make_engine(cfg, *, model=None, pad_token_id: int | None = None, eos_token_id=None,
                router_url: str | None = None, worker_urls: list[str] | None = None,
                model_path: str | None = None, **kwargs) -> RolloutEngine:
    """The engine ``cfg`` (a RolloutConfig) names.

    embedded: needs ``model`` (an HF causal LM) and ``pad_token_id``. sglang: connects to
    ``router_url`` / ``worker_urls`` when given, else launches ``cfg.sglang.servers_per_node`` servers of
    ``model_path`` and a router on this node.
    """
    if cfg.engine == "embedded":
        from delta_megatron.rollout.embedded import EmbeddedEngine

        if model is None or pad_token_id is None:
            raise ValueError("rollout.engine=embedded needs model= and pad_token_id=")
        return EmbeddedEngine(model, pad_token_id, eos_token_id, config=cfg, **kwargs)
    from delta_megatron.rollout.sglang_engine import SGLangEngine

    if router_url is not None or worker_urls:
        return SGLangEngine(router_url, worker_urls, config=cfg.sglang, **kwargs)
    if model_path is None:
        raise ValueError("rollout.engine=sglang needs router_url/worker_urls or model_path to launch")
    return SGLangEngine.launch(model_path, cfg.sglang, **kwargs)
