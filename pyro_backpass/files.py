"""Atomic file writes: a reader never sees a half-written checkpoint or result file; JSON lines
appended one durable line at a time, so a killed writer leaves only whole lines (and at most
one partial last line, which :func:`read_json_lines` drops)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "JsonLinesAppender",
    "atomic_write",
    "atomic_write_json",
    "read_json_lines",
    "whole_lines",
]


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path`` in one step.

    The temporary file lives in the destination folder so the rename never crosses file
    systems; on any error it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    return atomic_write(path, write)


def whole_lines(path: str | os.PathLike, *, repair: bool = False) -> list[str]:
    """The complete lines of a text file (without their newlines); a trailing line without
    its newline (a writer killed mid-line) is dropped, and with ``repair=True`` cut from the
    file too. A missing file has none."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    whole = data[: data.rfind(b"\n") + 1]  # b"" when there is no complete line
    if repair and len(whole) < len(data):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
            f.flush()
            os.fsync(f.fileno())
    return [line for line in whole.decode("utf-8").splitlines() if line.strip()]


def read_json_lines(path: str | os.PathLike, *, repair: bool = False) -> list[Any]:
    """The objects of a JSON-lines file, in order (its :func:`whole_lines`)."""
    return [json.loads(line) for line in whole_lines(path, repair=repair)]


class JsonLinesAppender:
    """Append JSON objects to a file one line at a time, each flushed and fsync'd before
    :meth:`write` returns (a context manager)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, obj: Any) -> None:
        self._file.write(json.dumps(obj, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonLinesAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
