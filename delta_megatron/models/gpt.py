"""megatron-core GPTModel from a ModelConfig (Qwen3 / Qwen2 / Llama) and a ParallelConfig.

All three families are the same megatron model: RMSNorm, SwiGLU (fused gate/up ``linear_fc1``), RoPE
(non-interleaved, like HF's ``rotate_half``), GQA, no linear biases; Qwen3 adds QK-norm, Qwen2 adds
q/k/v biases. Kernels come from a ``ModuleSpec``: megatron's local spec on CPU (and whenever TE is
missing), the Transformer Engine spec on GPU. Features that only TE implements (context-parallel
attention, THD packing, FP8) are rejected up front with an error naming the config field.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from delta_megatron.models.config import ModelConfig
from delta_megatron.parallel import ParallelConfig
from delta_megatron.utils.configs import ConfigError

__all__ = ["te_available", "resolve_layer_spec", "transformer_config", "layer_spec",
           "use_deterministic_kernels", "build_gpt_model", "build_model_chunks", "output_weight", "return_hidden",
           "padded_vocab_size", "unwrap"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# ParallelConfig.fp8 -> (TransformerConfig.fp8 format, fp8_recipe)
_FP8 = {"delayed": ("hybrid", "delayed"), "current": ("hybrid", "tensorwise"),
        "mxfp8": ("e4m3", "mxfp8")}


def te_available() -> bool:
    """Transformer Engine importable *and* a GPU present (TE's kernels are CUDA-only)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def _apex_norm_available() -> bool:
    try:
        import apex.normalization  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_layer_spec(parallel: ParallelConfig) -> str:
    """'te' or 'local'. Raises ConfigError when the config needs TE (CP>1, FP8, sequence parallel
    without apex) but TE is missing."""
    have_te = te_available()
    if parallel.layer_spec == "te" and not have_te:
        raise ConfigError("parallel.layer_spec", "te",
                          "Transformer Engine is not importable (or no CUDA): use local or auto")
    spec = "te" if parallel.layer_spec == "te" or (parallel.layer_spec == "auto" and have_te) \
        else "local"
    if spec == "local" and parallel.cp > 1:
        raise ConfigError("parallel.cp", parallel.cp,
                          "context-parallel attention needs the Transformer Engine layer spec "
                          "(megatron's local DotProductAttention asserts cp == 1)")
    if spec == "local" and parallel.sequence_parallel and not _apex_norm_available():
        raise ConfigError("parallel.sequence_parallel", True,
                          "the local layer spec without apex uses torch norms, which megatron-core "
                          "rejects under sequence parallelism: use the TE spec (GPU)")
    if spec == "local" and parallel.fp8 != "none":
        raise ConfigError("parallel.fp8", parallel.fp8,
                          "FP8 needs the Transformer Engine layer spec")
    return spec


def use_deterministic_kernels() -> None:
    """What ``train.deterministic`` asks of the process besides megatron's ``deterministic_mode``:
    TE attention without non-deterministic algorithms (megatron refuses deterministic_mode otherwise)
    and, on CUDA, a fixed cuBLAS workspace and torch's deterministic algorithms (warning, not failing,
    on an op that has none). The CPU kernels used here are deterministic already."""
    os.environ["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] = "0"
    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def padded_vocab_size(model: ModelConfig, tp: int) -> int:
    """Vocab rows in megatron: the real vocab rounded up to a multiple of TP (padding rows are
    zero on load, dropped on export and masked in the log-prob ops via ``vocab_size``)."""
    return -(-model.vocab_size // tp) * tp


def transformer_config(model: ModelConfig, parallel: ParallelConfig, **overrides):
    """megatron TransformerConfig for ``model`` under ``parallel``; ``overrides`` set extra fields
    (e.g. ``recompute_granularity``)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    if model.num_key_value_heads % parallel.tp:
        raise ConfigError("parallel.tp", parallel.tp,
                          f"must divide model.num_key_value_heads={model.num_key_value_heads} "
                          "(megatron-core splits query groups across TP ranks)")
    if model.num_layers % parallel.pp:
        raise ConfigError("parallel.pp", parallel.pp,
                          f"must divide model.num_layers={model.num_layers}")
    dtype = _DTYPES[model.params_dtype]
    fp8 = {}
    if parallel.fp8 != "none":
        fmt, recipe = _FP8[parallel.fp8]
        fp8 = dict(fp8=fmt, fp8_recipe=recipe)
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.intermediate_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_key_value_heads,
        kv_channels=model.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        qk_layernorm=model.use_qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.use_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        sequence_parallel=parallel.sequence_parallel,
        use_cpu_initialization=not torch.cuda.is_available(),
        variable_seq_lengths=True,  # packed micro-batches differ in length (PP sends shapes)
        moe_token_dispatcher_type="alltoall",  # the default (allgather) rejects the line above
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # gloo mis-pairs batched isend/irecv of equal-shape tensors between the same two ranks (the
        # interleaved schedule's steady state sends activations and gradients together): measured
        # wrong activations for one micro-batch in 4 with PP=2, VPP=2. Unbatched p2p is ordered.
        batch_p2p_comm=torch.cuda.is_available(),
        **fp8,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(model: ModelConfig, parallel: ParallelConfig):
    """The transformer layer ModuleSpec: TE on GPU with TE, megatron's local modules otherwise."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if resolve_layer_spec(parallel) == "te":
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.use_qk_norm)
    return specs.get_gpt_layer_local_spec(qk_layernorm=model.use_qk_norm, normalization="RMSNorm")


def build_gpt_model(model: ModelConfig, parallel: ParallelConfig, *, vp_stage: int | None = None,
                    pre_process: bool | None = None, post_process: bool | None = None,
                    config_overrides: dict | None = None):
    """One GPTModel (one virtual-pipeline chunk) for this rank. ``parallel_state`` must be set up
    (see :func:`delta_megatron.parallel.init_distributed`). ``pre_process`` / ``post_process``
    default to whether this rank/chunk is the first / last pipeline stage. The model returns logits
    ``[b, s, V/TP]`` (vocab-parallel); use :func:`return_hidden` to get ``h`` instead."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    from delta_megatron.utils import cpu_shim

    cpu_shim.apply()
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    config = transformer_config(model, parallel, **(config_overrides or {}))
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(model, parallel),
        vocab_size=padded_vocab_size(model, parallel.tp),
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=model.rope_theta,
        vp_stage=vp_stage,
    )
    if torch.cuda.is_available():
        gpt = gpt.cuda()
    return gpt


def build_model_chunks(model: ModelConfig, parallel: ParallelConfig, *, load_hf: bool = True,
                       **kwargs) -> list:
    """All model chunks of this rank: one per virtual pipeline stage (a single one without vpp).
    With ``load_hf`` and ``model.hf_path`` set, the HF weights are loaded (converter)."""
    if parallel.vpp is None:
        chunks = [build_gpt_model(model, parallel, **kwargs)]
    else:
        chunks = [build_gpt_model(model, parallel, vp_stage=i, **kwargs) for i in range(parallel.vpp)]
    if load_hf and model.hf_path:
        from delta_megatron.models.converter import hf_to_megatron

        hf_to_megatron(chunks, model, model.hf_path)
    return chunks


def unwrap(module):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def output_weight(model) -> torch.Tensor:
    """The LM-head weight shard ``[V/TP, d]`` this (last-stage) chunk multiplies ``h`` with."""
    gpt = unwrap(model)
    if not gpt.post_process:
        raise ValueError("output_weight: this model chunk is not the last pipeline stage")
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


@contextlib.contextmanager
def return_hidden(model) -> Iterator[None]:
    """Within the context the (last-stage) model returns ``h`` — the LM-head input after the final
    norm, ``[b, s, d]`` (``[b, s/TP, d]`` with sequence parallel) — instead of logits.

    Why: the log-prob pass runs the output layer chunk-wise from ``h`` (ops.logprob) so ``[tokens, V]``
    logits never exist, and DelTA reads ``h`` anyway. It keeps GPTModel's own forward (and thus the
    pipeline schedules) and only swaps the output layer's forward for an identity.
    """
    gpt = unwrap(model)
    if not gpt.post_process:
        yield
        return
    layer = gpt.output_layer

    def identity(hidden, weight=None, runtime_gather_output=None):  # noqa: ARG001
        return hidden, None

    layer.forward = identity
    try:
        yield
    finally:
        del layer.forward  # back to the class method


