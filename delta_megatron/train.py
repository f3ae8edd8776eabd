"""``delta-megatron train`` / ``python -m delta_megatron.train``: one RLVR run from a YAML file or a recipe.

    delta-megatron train --recipe pipelines.tiny_arith_cpu:rl_config credit.methods=[delta]
    torchrun --nproc-per-node 2 -m delta_megatron.train --config run.yaml parallel.tp=2 --resume auto

Exit code 75 means "preempted after saving a checkpoint: requeue me" (see utils/preemption.py).
"""

from __future__ import annotations

import argparse
import sys

from delta_megatron.config import Config, load_run_config


def parse(argv: list[str]) -> Config:
    parser = argparse.ArgumentParser(prog="delta-megatron train")
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--config", help="YAML config file")
    src.add_argument("--recipe", help="module:function returning a Config (see pipelines/)")
    parser.add_argument("--resume", help="none | auto | <checkpoint dir> (sets checkpoint.resume)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-6")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    return load_run_config(args.config, args.recipe, overrides)


def main(argv: list[str] | None = None) -> int:
    from delta_megatron.tracking import quiet_third_party_warnings
    from delta_megatron.trainer import run
    from delta_megatron.utils.preemption import REQUEUE_EXIT_CODE

    quiet_third_party_warnings()
    cfg = parse(list(sys.argv[1:] if argv is None else argv))
    _, preempted = run(cfg)
    return REQUEUE_EXIT_CODE if preempted else 0


if __name__ == "__main__":
    sys.exit(main())
