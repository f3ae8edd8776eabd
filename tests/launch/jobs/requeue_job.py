"""A job that behaves like the trainer under preemption, for the live requeue test.

Steps of ``--step-s`` seconds with a gloo all-reduce each; on SIGUSR1 (forwarded by the batch shell)
the preemption flag stops every rank at the same step, rank 0 writes a checkpoint marker with the
next step, and the job exits 75. A requeued run resumes from the marker (``--resume auto``
semantics). Every event goes to ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from delta_megatron.utils.preemption import REQUEUE_EXIT_CODE, Preemption, restart_count


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--step-s", type=float, default=0.25)
    args = parser.parse_args()
    out = Path(args.dir)
    ckpt = out / "ckpt.json"
    dist.init_process_group("gloo")
    rank0 = dist.get_rank() == 0

    def log(event: str, **fields) -> None:
        if rank0:
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"event": event, "restart": restart_count(), **fields}) + "\n")

    start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    log("start", start_step=start, job=os.environ.get("SLURM_JOB_ID"))
    with Preemption() as preempt:
        for step in range(start, args.steps):
            time.sleep(args.step_s)
            dist.all_reduce(torch.ones(1))
            if rank0:
                (out / "progress.json").write_text(json.dumps({"step": step, "restart": restart_count()}))
            if preempt.should_stop():
                if rank0:
                    ckpt.write_text(json.dumps({"step": step + 1, "reason": preempt.received}))
                log("preempted", saved_step=step + 1)
                dist.barrier()
                dist.destroy_process_group()
                return REQUEUE_EXIT_CODE
    log("done", final_step=args.steps)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
