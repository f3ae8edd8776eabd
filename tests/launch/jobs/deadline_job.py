"""A job that saves before its Slurm time limit, for the live deadline test.

Stages of ``--stage-s`` seconds, each ending with a gloo all-reduce; at every boundary the trainer's
own rule decides whether to stop — ``SaveSchedule.deadline_near`` on rank 0 (time left < save time +
longest stage, the end time from ``job_end_time``: ``squeue %L`` on Slurm 22.05), agreed by every rank
through ``Preemption.decide``. On a stop rank 0 writes its checkpoint marker, the job leaves the
launcher's requeue marker and exits 75 (as ``delta_megatron.train`` does), which the batch script
turns into a requeue; the requeued run resumes from the checkpoint marker. Every event
goes to ``metrics.jsonl``.

The amount of work is sized by the first run to 1.5× the stages it can fit before its deadline (and
kept in ``plan.json``), so one requeue is needed whatever the machine's start-up time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from delta_megatron.checkpoint.config import CheckpointConfig
from delta_megatron.checkpoint.schedule import SaveSchedule
from delta_megatron.utils.job_clock import job_end_time
from delta_megatron.utils.preemption import REQUEUE_EXIT_CODE, Preemption, mark_requeue, restart_count


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--stage-s", type=float, default=2.0)
    parser.add_argument("--save-s", type=float, default=15.0)
    args = parser.parse_args()
    out = Path(args.dir)
    ckpt = out / "ckpt.json"
    dist.init_process_group("gloo")
    rank0 = dist.get_rank() == 0

    def log(event: str, **fields) -> None:
        if rank0:
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as fh:
                fh.write(json.dumps({"event": event, "restart": restart_count(), "t": time.time(),
                                     **fields}) + "\n")

    end = job_end_time() if rank0 else None
    plan = out / "plan.json"
    if rank0 and not plan.exists():
        left = (end or time.time() + 60) - time.time()
        fits = max(1, int((left - args.save_s - args.stage_s) / args.stage_s))
        plan.write_text(json.dumps({"steps": fits + fits // 2 + 1}))
    dist.barrier()
    steps = json.loads(plan.read_text())["steps"]
    schedule = SaveSchedule(CheckpointConfig(save_seconds=args.save_s), end, steps)
    start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    log("start", start_step=start, end_time=end, time_left=schedule.time_left(), steps=steps)
    with Preemption() as preempt:
        for step in range(start, steps):
            time.sleep(args.stage_s)
            dist.all_reduce(torch.ones(1))
            schedule.mark("stage")
            stop, near = preempt.decide(rank0 and schedule.deadline_near())
            if stop or near:
                t0 = time.time()
                if rank0:
                    ckpt.write_text(json.dumps({"step": step + 1}))
                schedule.saved(time.time() - t0)
                log("stopped", saved_step=step + 1, reason="deadline" if near else preempt.received,
                    time_left=schedule.time_left())
                dist.barrier()
                dist.destroy_process_group()
                mark_requeue()  # as delta_megatron.train does: torchrun hides exit code 75
                return REQUEUE_EXIT_CODE
    log("done", final_step=steps)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
