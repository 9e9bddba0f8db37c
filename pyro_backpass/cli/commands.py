"""``main()`` and its parser: the ``pyro-backpass`` command line, one subcommand per module of
this package."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from pyro_backpass.cli import backbone_training, demo, parse, train
from pyro_backpass.cli.arguments import HelpFormatter, Parser

__all__ = ["USER_ERRORS", "build_parser", "main"]

# What a command raises about its inputs (a damaged file, a configuration that does not fit):
# reported as one "error:" line, exit 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, MemoryError)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="pyro-backpass",
        description="A backward pass through a CNN using a generative model of its activations.",
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each module registers its own subcommand.
    for command in (demo, parse, backbone_training, train):
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Run one subcommand. Bad options stop at parsing; errors the library raises about the
    inputs are one ``error:`` line too (set ``PYRO_BACKPASS_TRACEBACK=1`` to see the traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as err:
        if os.environ.get("PYRO_BACKPASS_TRACEBACK"):
            raise
        getattr(args, "command_parser", parser).error(str(err))
