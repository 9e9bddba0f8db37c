"""Atomic file writes: a reader never sees a half-written checkpoint or result file.

A write goes to a temporary file beside the target (``.<name>.<pid>-<random>.tmp``), which is
flushed to disk, given the permissions a plain ``open(path, "w")`` would give (the umask's), and
renamed onto the target in one step; the folder is then flushed too, so the rename survives a
power cut where the platform allows it. A process killed mid-write leaves its temporary file
behind; the next write of the same target removes it (its process is gone), so orphans do not
accumulate.

JSON lines (:class:`JsonLinesAppender`) are appended one durable line at a time instead, so a
killed writer leaves only whole lines and at most one partial last line, which
:func:`read_json_lines` drops.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "JsonLinesAppender",
    "atomic_write",
    "atomic_write_json",
    "check_keys",
    "read_json",
    "read_json_lines",
    "read_safetensors",
    "stale_temporaries",
    "whole_lines",
]


def _umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # another thread of this process may be writing the same target
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (another user's), or we cannot tell: leave its file alone
    return True


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files of earlier writes of ``path`` whose writing process no longer runs."""
    path = Path(path)
    prefix, suffix = f".{path.name}.", ".tmp"
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return []
    stale = []
    for name in names:
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        middle = name[len(prefix) : -len(suffix)]
        pid_text, sep, _ = middle.partition("-")
        # Files of the earlier naming (no pid) cannot belong to a write still running from
        # this version, so they count as stale.
        if not sep or not pid_text.isdigit() or not _pid_alive(int(pid_text)):
            stale.append(path.parent / name)
    return stale


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return  # folders cannot be opened on some platforms (Windows): nothing to flush
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path`` in one step.

    The temporary file lives in the destination folder so the rename never crosses file
    systems; on any error it is removed and ``path`` is left as it was. The new file gets mode
    ``0o666 & ~umask``, like any file the process creates; its data are on disk before the
    rename. Temporary files left by killed writes of the same ``path`` are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in stale_temporaries(path):
        stale.unlink(missing_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0o600 is for the temporary file only
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent, directory=True)
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    return atomic_write(path, write)


def check_keys(config: Any, keys: Sequence[str], *, source: str | os.PathLike) -> None:
    """Raise a ``ValueError`` naming ``source`` and the missing keys unless ``config`` is a JSON
    object holding every one of ``keys`` (a damaged file, or one another program wrote)."""
    if not isinstance(config, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    missing = [k for k in keys if k not in config]
    if missing:
        raise ValueError(f"{source}: missing key(s) {missing} (damaged, or not written by save?)")


def read_json(path: str | os.PathLike, *, keys: Sequence[str] = ()) -> Any:
    """The JSON in ``path``, with a ``ValueError`` naming the file when it is not JSON (corrupt,
    truncated) or, with ``keys``, not an object holding them (:func:`check_keys`)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON (corrupt or truncated?): {err}") from None
    if keys:
        check_keys(obj, keys, source=path)
    return obj


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


def read_safetensors(path: str | os.PathLike, *, what: str) -> tuple[dict[str, str], dict]:
    """``(metadata, tensors)`` of a safetensors file on CPU; ``FileNotFoundError`` naming
    ``what`` if absent, ``ValueError`` if unreadable (never safetensors' own trace)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} file at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err})") from None
