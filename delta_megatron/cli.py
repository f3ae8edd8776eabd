"""``delta-megatron`` command line: train, export, plan, launch, eval.

The library never imports ``launchers/``; the ``launch`` subcommand imports it lazily, so the CPU
install works without NeMo-Run.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="delta-megatron", description=__doc__)
    parser.add_argument("command", choices=["train", "export", "plan", "launch", "eval"])
    args, rest = parser.parse_known_args(argv[:1])
    rest = argv[1:]
    if args.command == "train":
        from delta_megatron.train import main as train_main

        return train_main(rest)
    if args.command == "export":
        from delta_megatron.cli_export import main as export_main

        return export_main(rest)
    if args.command == "plan":
        from delta_megatron.planner import main as plan_main

        return plan_main(rest)
    if args.command == "launch":
        from launchers.launch import main as launch_main

        return launch_main(rest)
    from delta_megatron.cli_eval import main as eval_main

    return eval_main(rest)


if __name__ == "__main__":
    sys.exit(main())
