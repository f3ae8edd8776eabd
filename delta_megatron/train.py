"""``delta-megatron train`` / ``python -m delta_megatron.train``: one RLVR run from a YAML file or a recipe.

    delta-megatron train --recipe pipelines.tiny_arith_cpu:config credit.methods=[delta]
    torchrun --nproc-per-node 2 -m delta_megatron.train --config run.yaml --resume auto parallel.tp=2

Exit code 75 (and the launcher's requeue marker) means "stopped after saving a checkpoint: requeue me"
(see utils/preemption.py).
"""

from __future__ import annotations

import argparse
import sys

from delta_megatron.config import Config, ConfigError, load_run_config
from delta_megatron.utils.commands import command_parser


def parser() -> argparse.ArgumentParser:
    p = command_parser(
        "delta-megatron train",
        "Run one RLVR training job: rollout -> reward -> advantages -> token credit -> PPO updates,\n"
        "with periodic eval and checkpoints. Under torchrun every rank runs this same command.",
        """\
        a YAML config (--config) or a recipe (--recipe module:function, or a name from pipelines/),
        then dotted overrides anywhere on the line (train.lr=1e-6 credit.methods=[delta]);
        everything is validated before any work starts (see `delta-megatron config explain`)""",
        """\
        <logging.dir>/config.yaml (the resolved config), metrics.jsonl, samples.jsonl, tensorboard/,
        eval/step_N.md, checkpoints/step_N/ (checkpoint.dir); exit code 75 = preempted after saving
        a checkpoint (requeue me), 2 = bad config""",
        ["delta-megatron train --recipe pipelines.tiny_arith_cpu:config --resume auto train.steps=10",
         "torchrun --nproc-per-node 2 -m delta_megatron.train --config run.yaml parallel.tp=2"])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", help="YAML config file")
    src.add_argument("--recipe", help="module:function returning a Config (see pipelines/)")
    p.add_argument("--resume", help="none | auto | <checkpoint dir> (sets checkpoint.resume)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-6")
    return p


def parse(argv: list[str]) -> Config:
    args = parser().parse_intermixed_args(argv)
    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    return load_run_config(args.config, args.recipe, overrides)


def main(argv: list[str] | None = None) -> int:
    from delta_megatron.tracking import quiet_third_party_warnings
    from delta_megatron.trainer import run
    from delta_megatron.utils.preemption import REQUEUE_EXIT_CODE, mark_requeue

    quiet_third_party_warnings()
    try:
        cfg = parse(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _, preempted = run(cfg)
    if preempted:  # saved at a stage boundary (signal or the job's end time): requeue me
        mark_requeue()
    return REQUEUE_EXIT_CODE if preempted else 0


if __name__ == "__main__":
    sys.exit(main())
