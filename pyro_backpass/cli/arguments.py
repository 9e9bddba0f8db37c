"""What every subcommand shares: the parser class, its help format and the checked option types.

A bad value is refused while the command line is parsed, before any work starts, with one
line on stderr (``pyro-backpass demo: error: argument --top-k: ...``) and exit status 2.
A subcommand module uses it like this::

    p = add_command(sub, "demo", help="...", doc=__doc__)
    p.add_argument("--top-k", type=positive_int, default=12, help="...")
    p.add_argument("--device", type=any_device, default="auto", help=DEVICE_HELP)
    p.add_argument("--out", type=output_dir, default=Path("figures/demo"), help="...")

Values a command lowers on its own (a cap) are reported with :func:`note`, never silently.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import NoReturn

import torch

from pyro_backpass.cli.device import DEVICE_HELP, available_device

__all__ = [
    "DEVICE_HELP",
    "HelpFormatter",
    "Parser",
    "add_command",
    "any_device",
    "checkpoint_stem",
    "cpu_device",
    "input_dir",
    "input_file",
    "non_negative_int",
    "note",
    "output_dir",
    "plain_text",
    "positive_float",
    "positive_int",
]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` with every default shown (unless it is None, False, or the help names it
    already) and the description's paragraphs kept."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(str(v) for v in default)
        return f"{text} (default: {default})"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line: ``prog: error: message``, exit 2."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())  # one line, whatever the message held
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_ROLE = re.compile(r":[a-z]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`~a.b` or :ref:`x <y>`


def plain_text(doc: str | None) -> str:
    """A module docstring as plain text for ``--help``: reST roles and literals unwrapped
    (``:func:`~a.b.c``` → ``c``, ````x```` → ``x``), a trailing References section dropped."""
    text = (doc or "").split("References:")[0].split("Reference:")[0]
    text = _ROLE.sub(lambda m: m.group(1).split(".")[-1], text)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"`([^`]*)`_?", r"\1", text)
    text = text.replace("::\n", ":\n")
    return text.strip() + "\n"


def add_command(
    sub: argparse._SubParsersAction, name: str, *, help: str, doc: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand's parser: one-line ``help`` in the command list, ``doc`` (a module
    docstring, made plain) as the description of its ``--help``."""
    parser = sub.add_parser(
        name, help=help, description=plain_text(doc) if doc else help, formatter_class=HelpFormatter
    )
    parser.set_defaults(command_parser=parser)  # main() reports the command's errors with it
    return parser


def note(message: str) -> None:
    """Tell the user about a value the command changed (a cap), on stderr, one line."""
    print(f"note: {message}", file=sys.stderr)


# ---------------------------------------------------------------------- option types
# argparse calls these on the text of an option; an ArgumentTypeError becomes the one-line
# "error: argument --x: <message>".


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def any_device(text: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda[:n]``, ... resolved to a device this machine has
    (:func:`~pyro_backpass.cli.device.available_device`)."""
    try:
        return available_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def cpu_device(text: str) -> torch.device:
    """:func:`any_device`, for commands that run on the CPU only."""
    dev = any_device(text)
    if dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text}: this command runs on the CPU only")
    return dev


def _no_file_above(path: Path, text: str) -> None:
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: {parent} is a file, not a folder")


def output_dir(text: str) -> Path:
    """A folder to write into: created if missing; an existing file there is an error."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is an existing file, not a folder")
    _no_file_above(path, text)
    return path


def checkpoint_stem(text: str) -> Path:
    """A checkpoint's stem (``STEM.safetensors`` + ``STEM.json`` are written; an existing
    checkpoint there is replaced, atomically)."""
    path = Path(text)
    if path.suffix not in ("", ".safetensors", ".json"):
        raise argparse.ArgumentTypeError(
            f"{text}: give a stem (or STEM.safetensors); the checkpoint is STEM.safetensors + "
            "STEM.json"
        )
    stem = path.with_suffix("")
    for target in (stem.with_suffix(".safetensors"), stem.with_suffix(".json")):
        if target.is_dir():
            raise argparse.ArgumentTypeError(f"{text}: {target} is a folder")
    if stem.exists() and not stem.is_dir() and path.suffix == "":
        raise argparse.ArgumentTypeError(f"{text} is an existing file; give a new stem")
    _no_file_above(stem, text)
    return stem


def input_file(text: str) -> Path:
    """A file that must exist."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text} is not a file")
    return path


def input_dir(text: str) -> Path:
    """A folder that must exist."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such folder")
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return path
