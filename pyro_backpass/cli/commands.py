"""``main()`` and its parser: the ``pyro-backpass`` command line, one subcommand per module of
this package."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pyro_backpass.cli import backbone_training, demo, parse, train

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyro-backpass",
        description="A backward pass through a CNN using a generative model of its activations.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (
        demo,
        parse,
        backbone_training,
        train,
    ):  # each module registers its own subcommand
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)
