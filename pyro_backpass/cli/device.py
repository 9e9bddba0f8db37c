"""``--device auto|cpu|cuda[:n]`` resolved to a ``torch.device``: the one place that chooses.

The library follows the device of its inputs; only entry points (this command line, notebooks,
benchmarks) pick one.
"""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when there is one, else CPU; anything else is passed to torch."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise SystemExit(f"--device: unknown device {name!r} ({err})") from None
