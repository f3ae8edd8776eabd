"""torchrun worker for tests/checkpoint/test_integrity_dist.py: every rank writes its own shard of
rank-dependent bytes into one checkpoint (as dist-ckpt does), the manifest is hashed by all ranks
together, and ``resolve_resume`` gives every rank the answer of rank 0 (or its error)."""

import argparse
import json
from pathlib import Path

import torch.distributed as dist

from delta_megatron.checkpoint import CheckpointError, CheckpointManager, resolve_resume
from delta_megatron.config import ModelConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    root = Path(args.root)
    mgr = CheckpointManager(root, keep=2)
    for step in (1, 2):
        mgr.save(step, lambda d, s=step: (d / f"__{rank}_0.distcp").write_bytes(bytes([rank, s]) * (1000 * (rank + 1))),
                 model=ModelConfig())
    path = resolve_resume("auto", root, model=ModelConfig())
    dist.barrier()
    if rank == 0:  # damage step 2 while the others wait
        with open(root / "step_00000002" / f"__{world - 1}_0.distcp", "r+b") as fh:
            fh.write(b"\0\0")
    dist.barrier()
    fallback = resolve_resume("auto", root, model=ModelConfig())
    try:
        resolve_resume(str(root / "step_00000002"), root)
        named = None
    except CheckpointError as err:
        named = str(err)
    (root / f"rank{rank}.json").write_text(json.dumps(
        {"auto": str(path), "fallback": str(fallback), "named": named}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
