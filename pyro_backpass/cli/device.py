"""``--device auto|cpu|cuda[:n]`` resolved to a ``torch.device``: the one place that chooses.

The library follows the device of its inputs; only entry points (this command line, notebooks,
benchmarks) pick one.
"""

from __future__ import annotations

import torch

__all__ = ["DEVICE_HELP", "available_device", "resolve_device"]

DEVICE_HELP = "auto (CUDA if there is one, else CPU), cpu, cuda, cuda:1, ..."


def available_device(name: str) -> torch.device:
    """``name`` as a device this machine has, else a ``ValueError`` saying why not; ``auto``
    picks CUDA when there is one, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r} ({DEVICE_HELP})") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name}: CUDA is not available on this machine")
        if (dev.index or 0) >= count:
            raise ValueError(f"{name}: this machine has {count} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not supported ({DEVICE_HELP})")
    return dev


def resolve_device(name: str) -> torch.device:
    """:func:`available_device`, exiting with the reason when there is no such device."""
    try:
        return available_device(name)
    except ValueError as err:
        raise SystemExit(f"--device: {err}") from None
