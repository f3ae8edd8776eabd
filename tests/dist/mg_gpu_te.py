"""torchrun worker (GPU + Transformer Engine only): TE spec vs local spec, CP=2 vs unsharded.

``--mode spec`` (1 GPU): the same HF weights in a local-spec and a TE-spec GPTModel (bf16) give the
same logits within bf16 tolerance. ``--mode cp`` (2 GPUs, CP=2): THD-packed sequences split with
the load-balanced CP partition (ops.packing.cp_partition_index) give the logits of the unsharded
reference saved by the parent. Written against megatron-core/TE's documented APIs; validated only
on a GPU machine with TE (none in CI).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
from mg_common import sample_sequences  # tests/dist is the script dir


def build(cfg, par):
    from delta_megatron.models.converter import hf_to_megatron
    from delta_megatron.models.gpt import build_gpt_model

    model = build_gpt_model(cfg, par).eval()
    hf_to_megatron(model, cfg, cfg.hf_path)
    return model


def spec_mode(model_dir: Path) -> None:
    from delta_megatron.config import ParallelConfig
    from delta_megatron.models.hf_config import load_model_config
    from delta_megatron.ops.packing import pack_sequences

    cfg = load_model_config(model_dir, params_dtype="bfloat16")
    seqs = sample_sequences()
    outs = {}
    for spec in ("local", "te"):
        model = build(cfg, ParallelConfig(layer_spec=spec))
        with torch.no_grad():
            outs[spec] = [model(s[None].cuda(), torch.arange(len(s))[None].cuda(), None)[0].float()
                          for s in seqs]
        pk = pack_sequences(seqs, "te" if spec == "te" else "local", device="cuda")
        with torch.no_grad():
            packed = model(**pk.forward_kwargs())[0].float()
        for a, b in zip(pk.unpack(packed), outs[spec]):
            torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
    for a, b in zip(outs["local"], outs["te"]):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


def cp_mode(model_dir: Path, ref_path: Path) -> None:
    from megatron.core import parallel_state as ps

    from delta_megatron.config import ParallelConfig
    from delta_megatron.models.hf_config import load_model_config
    from delta_megatron.ops.packing import cp_partition_index, pack_sequences, packing_alignment

    cfg = load_model_config(model_dir, params_dtype="bfloat16")
    cp, rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    model = build(cfg, ParallelConfig(cp=cp, layer_spec="te"))
    seqs = sample_sequences()
    pk = pack_sequences(seqs, "te", align=packing_alignment(1, cp), device="cuda")
    idx = cp_partition_index(pk.cu_seqlens_padded.cpu(), cp, rank).cuda()
    pk.packed_seq_params.cp_group = ps.get_context_parallel_group()
    with torch.no_grad():
        local = model(input_ids=pk.input_ids[:, idx], position_ids=pk.position_ids[:, idx],
                      attention_mask=None, packed_seq_params=pk.packed_seq_params)[0].float()
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local.contiguous(), group=ps.get_context_parallel_group())
    full = torch.empty(pk.total_len, local.shape[-1], device="cuda")
    for r, part in enumerate(parts):
        full[cp_partition_index(pk.cu_seqlens_padded.cpu(), cp, r).cuda()] = part
    ref = torch.load(ref_path)
    for a, b in zip(pk.unpack(full), ref):
        torch.testing.assert_close(a.cpu(), b[:, : a.shape[-1]], atol=5e-2, rtol=5e-2)


def main() -> None:
    from delta_megatron import parallel
    from delta_megatron.config import ParallelConfig

    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["spec", "cp"], required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--ref", type=Path)
    args = ap.parse_args()
    cp = int(os.environ.get("WORLD_SIZE", "1")) if args.mode == "cp" else 1
    parallel.init_distributed(ParallelConfig(cp=cp, layer_spec="te"), seed=3)
    if args.mode == "spec":
        spec_mode(args.model)
    else:
        cp_mode(args.model, args.ref)
    dist.barrier()
    parallel.destroy()


if __name__ == "__main__":
    main()
