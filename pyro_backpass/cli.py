"""The ``pyro-backpass`` command line (also ``python -m pyro_backpass``).

Each subcommand lives with the code it drives and registers itself through an
``add_parser(subparsers)`` function; this file only collects them. The device is resolved here
(``--device auto``) and nowhere in the library.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

__all__ = ["main", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when there is one, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise SystemExit(f"--device: unknown device {name!r} ({err})") from None


def build_parser() -> argparse.ArgumentParser:
    from pyro_backpass import demo

    parser = argparse.ArgumentParser(
        prog="pyro-backpass",
        description="A backward pass through a CNN using a generative model of its activations.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_parser(sub)
    # Further subcommands (train-backbone, ...) register here.
    __import__("pyro_backpass.backbone.train", fromlist=["add_parser"]).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)
