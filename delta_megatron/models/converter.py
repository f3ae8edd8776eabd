"""Megatron (TP/PP-sharded GPTModel) <-> HF weights for Qwen3 / Qwen2 / Llama — one code path for
weight sync to rollout engines, HF export and loading HF checkpoints into the actor.

Layouts (``ng`` query groups = KV heads, ``qpg`` = heads per group, ``hd`` = head dim, ``r`` = TP rank):

* ``linear_qkv`` (fused, megatron's interleaved GQA order): rows ``[ng, (qpg + 2)·hd]`` — per group
  its ``qpg`` query heads, then its key head, then its value head; TP splits whole groups.
* ``linear_fc1`` (SwiGLU): each TP rank holds ``[gate_r; up_r]`` (megatron chunks the local output in
  two), so the full HF ``gate``/``up`` are the concatenations of the rank halves.
* ``linear_proj`` / ``linear_fc2`` are row-parallel (split on dim 1); embeddings and the untied
  output layer are vocab-parallel (dim 0, padded to a multiple of TP); norms are replicated.
* Tied embeddings: HF has only ``model.embed_tokens.weight``; megatron's last stage keeps a copy
  (``output_layer.weight``) when PP > 1, which is loaded from it and not exported.

Every conversion is reshape/cat/split only, so HF -> Megatron -> HF is bit-exact.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from delta_megatron.models.config import ModelConfig

__all__ = ["megatron_to_hf", "hf_to_megatron", "hf_param_names", "merge_shards", "split_for_rank",
           "HFSource"]

# megatron suffix inside a layer -> (kind, HF suffixes inside model.layers.{i})
_LAYER_MAP: dict[str, tuple[str, tuple[str, ...]]] = {
    "input_layernorm.weight": ("rep", ("input_layernorm.weight",)),
    "self_attention.linear_qkv.layer_norm_weight": ("rep", ("input_layernorm.weight",)),  # TE
    "self_attention.linear_qkv.weight": (
        "qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")),
    "self_attention.linear_qkv.bias": (
        "qkv", ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")),
    "self_attention.q_layernorm.weight": ("rep", ("self_attn.q_norm.weight",)),
    "self_attention.k_layernorm.weight": ("rep", ("self_attn.k_norm.weight",)),
    "self_attention.linear_proj.weight": ("row", ("self_attn.o_proj.weight",)),
    "pre_mlp_layernorm.weight": ("rep", ("post_attention_layernorm.weight",)),
    "mlp.linear_fc1.layer_norm_weight": ("rep", ("post_attention_layernorm.weight",)),  # TE
    "mlp.linear_fc1.weight": ("gated", ("mlp.gate_proj.weight", "mlp.up_proj.weight")),
    "mlp.linear_fc2.weight": ("row", ("mlp.down_proj.weight",)),
}
_GLOBAL_MAP: dict[str, tuple[str, tuple[str, ...]]] = {
    "embedding.word_embeddings.weight": ("vocab", ("model.embed_tokens.weight",)),
    "decoder.final_layernorm.weight": ("rep", ("model.norm.weight",)),
    "output_layer.weight": ("vocab", ("lm_head.weight",)),
}
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


# (megatron name, parameter, layout kind, HF names, exported)
ParamMapping = tuple[str, torch.nn.Parameter, str, tuple[str, ...], bool]


def hf_param_names(chunk, cfg: ModelConfig) -> list[ParamMapping]:
    """For each parameter of a megatron model chunk: ``(megatron name, param, kind, HF names,
    exported)``. ``exported`` is False for the tied output-layer copy on the last PP stage."""
    gpt = _unwrap(chunk)
    out = []
    for name, param in gpt.named_parameters():
        m = _LAYER_RE.match(name)
        if m:
            if m.group(2) not in _LAYER_MAP:
                raise KeyError(f"converter: no HF mapping for megatron parameter {name!r}")
            kind, suffixes = _LAYER_MAP[m.group(2)]
            layer = gpt.decoder.layers[int(m.group(1))].layer_number - 1  # global index
            out.append((name, param, kind, tuple(f"model.layers.{layer}.{s}" for s in suffixes),
                        True))
            continue
        if name not in _GLOBAL_MAP:
            raise KeyError(f"converter: no HF mapping for megatron parameter {name!r}")
        kind, hf = _GLOBAL_MAP[name]
        if name == "output_layer.weight" and cfg.tie_word_embeddings:
            out.append((name, param, kind, ("model.embed_tokens.weight",), False))
        else:
            out.append((name, param, kind, hf, True))
    return out


def _groups(cfg: ModelConfig) -> tuple[int, int, int]:
    ng = cfg.num_key_value_heads
    return ng, cfg.num_attention_heads // ng, cfg.kv_channels


def merge_shards(kind: str, shards: Sequence[torch.Tensor], cfg: ModelConfig) -> list[torch.Tensor]:
    """Full HF tensors (in the order of the mapping's HF names) from the TP-rank shards."""
    if kind == "rep":
        return [shards[0]]
    if kind == "row":
        return [torch.cat(list(shards), dim=1)]
    if kind == "vocab":
        return [torch.cat(list(shards), dim=0)[: cfg.vocab_size]]
    if kind == "gated":
        halves = [s.chunk(2, dim=0) for s in shards]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]
    if kind == "qkv":
        ng, qpg, hd = _groups(cfg)
        rest = shards[0].shape[1:]
        fused = torch.cat([s.reshape(-1, (qpg + 2) * hd, *rest) for s in shards])  # [ng, (qpg+2)hd, ..]
        q, k, v = fused.split([qpg * hd, hd, hd], dim=1)
        return [q.reshape(ng * qpg * hd, *rest), k.reshape(ng * hd, *rest),
                v.reshape(ng * hd, *rest)]
    raise ValueError(kind)


def split_for_rank(kind: str, full: Sequence[torch.Tensor], cfg: ModelConfig, rank: int,
                   size: int, padded_rows: int | None = None) -> torch.Tensor:
    """This TP rank's megatron shard from the full HF tensors (inverse of :func:`merge_shards`)."""
    if kind == "rep":
        return full[0]
    if kind == "row":
        return full[0].chunk(size, dim=1)[rank]
    if kind == "vocab":
        t = full[0]
        if padded_rows is not None and padded_rows > t.shape[0]:
            pad = t.new_zeros(padded_rows - t.shape[0], *t.shape[1:])
            t = torch.cat([t, pad])
        return t.chunk(size, dim=0)[rank]
    if kind == "gated":
        return torch.cat([full[0].chunk(size)[rank], full[1].chunk(size)[rank]])
    if kind == "qkv":
        ng, qpg, hd = _groups(cfg)
        q, k, v = full
        rest = q.shape[1:]
        fused = torch.cat([q.reshape(ng, qpg * hd, *rest), k.reshape(ng, hd, *rest),
                           v.reshape(ng, hd, *rest)], dim=1)  # [ng, (qpg+2)hd, ...]
        return fused.chunk(size, dim=0)[rank].reshape(-1, *rest)
    raise ValueError(kind)


def _default_tp_group():
    from megatron.core import parallel_state as ps

    if dist.is_initialized() and ps.model_parallel_is_initialized():
        return ps.get_tensor_model_parallel_group()
    return None


def _gather(t: torch.Tensor, group, kind: str) -> list[torch.Tensor] | None:
    """Shards of ``t`` from every rank of ``group`` on the group's first rank (None elsewhere)."""
    if group is None or dist.get_world_size(group) == 1:
        return [t]
    if kind == "rep":
        return [t] if dist.get_rank(group) == 0 else None
    t = t.contiguous()
    dst = dist.get_global_rank(group, 0)
    if dist.get_rank(group) == 0:
        shards = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.gather(t, shards, dst=dst, group=group)
        return shards
    dist.gather(t, None, dst=dst, group=group)
    return None


def megatron_to_hf(models, cfg: ModelConfig, *, bucket_bytes: int = 512 << 20, tp_group=None,
                   dtype: torch.dtype | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Stream this pipeline stage's weights as HF ``(name, tensor)`` buckets of at most ``bucket_bytes``
    (a larger single weight forms its own bucket).

    Collective over the TP group: every TP rank of the stage must iterate the generator. The buckets
    appear on TP rank 0 only (the stage's sender); the other TP ranks get an empty list at the same
    points — bucket boundaries come from parameter shapes alone, so a caller can run one more
    collective per bucket in step on every TP rank. Only one bucket is alive at a time. Layers carry
    global indices; each PP stage emits its own layers (one sender per stage), and one data-parallel
    replica suffices (other replicas need not call this). ``dtype`` casts the emitted tensors (e.g.
    bf16 for a rollout engine); default: as stored. (Not wrapped in ``torch.no_grad``: every tensor
    comes from ``param.detach()``, and torch's generator wrapper would keep the previous bucket alive
    until the next one is built — two buckets instead of one.)
    """
    if not isinstance(models, (list, tuple)):
        models = [models]
    group = tp_group if tp_group is not None else _default_tp_group()
    tp = dist.get_world_size(group) if group is not None else 1
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for chunk in models:
        for _, param, kind, hf_names, exported in hf_param_names(chunk, cfg):
            if not exported:
                continue
            nbytes = param.numel() * (1 if kind == "rep" else tp) * (dtype or param.dtype).itemsize
            if size and size + nbytes > bucket_bytes:  # full: hand it out before gathering more
                yield bucket
                bucket, size = [], 0
            shards = _gather(param.detach(), group, kind)
            size += nbytes
            for name, tensor in zip(hf_names, merge_shards(kind, shards, cfg) if shards is not None else ()):
                if dtype is not None:
                    tensor = tensor.to(dtype)
                if tensor.untyped_storage().data_ptr() == param.untyped_storage().data_ptr():
                    tensor = tensor.clone()  # a replicated weight: never hand out the parameter itself
                bucket.append((name, tensor.contiguous()))
            del shards
    if size:
        yield bucket


class HFSource:
    """Lazy reader of HF weights from a state dict or a safetensors directory (sharded or not)."""

    def __init__(self, source: Mapping[str, torch.Tensor] | str | Path):
        self._dict = source if isinstance(source, Mapping) else None
        self._files: dict[str, Path] = {}
        if self._dict is None:
            root = Path(source)
            index = root / "model.safetensors.index.json"
            if index.exists():
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                self._files = {k: root / v for k, v in weight_map.items()}
            else:
                from safetensors import safe_open

                files = sorted(root.glob("*.safetensors"))
                if not files:
                    raise FileNotFoundError(f"no *.safetensors in {root}")
                for f in files:
                    with safe_open(str(f), framework="pt") as fh:
                        self._files.update({k: f for k in fh.keys()})

    def __contains__(self, name: str) -> bool:
        return name in (self._dict if self._dict is not None else self._files)

    def get(self, name: str) -> torch.Tensor:
        if self._dict is not None:
            return self._dict[name]
        from safetensors import safe_open

        if name not in self._files:
            raise KeyError(f"HF checkpoint has no tensor {name!r}")
        with safe_open(str(self._files[name]), framework="pt") as fh:
            return fh.get_tensor(name)


@torch.no_grad()
def hf_to_megatron(models, cfg: ModelConfig, source, *, tp_rank: int | None = None,
                   tp_size: int | None = None) -> None:
    """Load HF weights (state dict, safetensors dir or :class:`HFSource`) into this rank's chunks.

    No communication: every rank reads the HF tensors its parameters need and slices its shard.
    Strict: every megatron parameter must be found. TP coordinates default to parallel_state's.
    """
    if not isinstance(models, (list, tuple)):
        models = [models]
    src = source if isinstance(source, HFSource) else HFSource(source)
    if tp_rank is None or tp_size is None:
        group = _default_tp_group()
        tp_rank = dist.get_rank(group) if group is not None else 0
        tp_size = dist.get_world_size(group) if group is not None else 1
    for chunk in models:
        for name, param, kind, hf_names, _ in hf_param_names(chunk, cfg):
            missing = [n for n in hf_names if n not in src]
            if missing:
                raise KeyError(f"HF checkpoint lacks {missing} (needed for megatron {name!r})")
            full = [src.get(n) for n in hf_names]
            rows = param.shape[0] * tp_size if kind == "vocab" else None
            shard = split_for_rank(kind, full, cfg, tp_rank, tp_size, padded_rows=rows)
            if shard.shape != param.shape:
                raise ValueError(f"{name}: HF gives shard {tuple(shard.shape)}, megatron has "
                                 f"{tuple(param.shape)} (check ModelConfig vs the checkpoint)")
            param.data.copy_(shard)
