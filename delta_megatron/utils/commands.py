"""One help layout for every ``delta-megatron`` subcommand: what it does, its inputs, its outputs and
an example, so ``delta-megatron COMMAND --help`` answers the first questions of a new user the same way
everywhere (tests/test_cli.py holds every subcommand to it)."""

from __future__ import annotations

import argparse
import textwrap

__all__ = ["command_parser"]


def command_parser(prog: str, what: str, inputs: str, outputs: str,
                   examples: list[str]) -> argparse.ArgumentParser:
    """An ArgumentParser whose help reads: ``what``, then ``Inputs:``, ``Outputs:`` and ``Example:``
    paragraphs (kept as written: no re-wrapping)."""
    body = "\n\n".join([textwrap.dedent(what).strip(),  # each line as given (dedented)
                        "Inputs:\n" + textwrap.indent(textwrap.dedent(inputs).strip(), "  "),
                        "Outputs:\n" + textwrap.indent(textwrap.dedent(outputs).strip(), "  ")])
    epilog = "Example:\n" + "\n".join(f"  {line}" for line in examples)
    return argparse.ArgumentParser(prog=prog, description=body, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
