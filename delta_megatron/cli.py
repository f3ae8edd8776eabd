"""The ``delta-megatron`` command: a table of subcommands, each a module with ``main(argv) -> int``.

Adding a subcommand is one line in :data:`COMMANDS` (its module is imported only when it runs, so the
CPU install works without NeMo-Run and ``--help`` stays fast).
"""

from __future__ import annotations

import difflib
import importlib
import sys

# name -> (module with main(argv), one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("delta_megatron.train", "run RL training from a recipe or a YAML config (resumable)"),
    "eval": ("delta_megatron.cli_eval", "sample a model on the eval sets: avg@k / pass@k tables (--rl: "
             "selective extrapolation)"),
    "export": ("delta_megatron.cli_export", "convert a trainer checkpoint to an HF model directory"),
    "plan": ("delta_megatron.planner", "memory and step time of a layout on a cluster; rejects misfits"),
    "launch": ("launchers.launch", "submit a recipe to Slurm (or run it locally) through NeMo-Run"),
    "config": ("delta_megatron.cli_config", "show, explain or diff resolved run configs"),
    "doctor": ("delta_megatron.cli_doctor", "check this node has what a run needs (ok / warn / fail + fix)"),
    "study": ("delta_megatron.cli_study", "seeded method comparison (local pool or Slurm) and its statistics"),
    "serve": ("delta_megatron.cli_serve", "one serving node of a disaggregated run: its SGLang servers (+ router)"),
    "analyze": ("delta_megatron.cli_analyze", "what an RL run changed: per-token dlogp vs its base model"),
}

EXAMPLES = [
    "delta-megatron train --recipe pipelines.tiny_arith_cpu:config credit.methods=[delta]",
    "delta-megatron config show qwen3-8b-delta train.lr=2e-6",
    "delta-megatron config explain credit.delta.lambda_range",
    "delta-megatron config diff table3-qwen3-8b@dapo table3-qwen3-8b@delta",
    "delta-megatron doctor qwen3-8b-delta --nodes 2",
    "delta-megatron plan qwen3-14b-delta --nodes 2 --cluster b200",
    "delta-megatron launch qwen3-8b-delta --executor slurm --cluster b200 --nodes 2 --dry-run",
    "delta-megatron study --recipe pipelines.scaffold_arith_cpu:config --methods dapo,delta --seeds 8",
    "delta-megatron export runs/demo/delta runs/demo/delta/hf",
    "delta-megatron eval --config runs/demo/delta/config.yaml --model runs/demo/delta/hf eval.k=4",
    "delta-megatron analyze dlogp --base runs/demo/sft_model --rl runs/demo/delta --data synthetic:arith@eval",
]


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("delta-megatron")
    except PackageNotFoundError:
        return "unknown (not installed; run `pip install -e .` or `make install`)"


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: delta-megatron [--help] [--version] COMMAND [ARGS...]", "",
             "RLVR post-training on megatron-core with token credit assignment (DelTA and baselines).", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "`delta-megatron COMMAND --help` says what a command reads, writes, and shows an example.",
              "", "examples:"]
    lines += [f"  {example}" for example in EXAMPLES]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), end="")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"delta-megatron {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"delta-megatron: unknown command {name!r}{hint}; commands: {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
