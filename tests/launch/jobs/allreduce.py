"""A tiny torchrun job for the launcher tests: every rank all-reduces (rank + 1) over gloo and rank 0
appends one metrics line (world size, the sum, who ran where)."""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    ranks: list = [None] * world
    dist.all_gather_object(ranks, {"rank": rank, "local_rank": int(os.environ["LOCAL_RANK"]),
                                   "slurm_job": os.environ.get("SLURM_JOB_ID")})
    if rank == 0:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"world_size": world, "allreduce_sum": value.item(), "ranks": ranks}) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
