"""The process group of a command launched by ``torchrun``: started here, in the entry point,
never by the library (which reads it through :meth:`World.current`).

``torchrun --nproc_per_node=P -m pyro_backpass.cli <command> ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in every process's environment; a
plain ``pyro-backpass`` run has none of them and stays a single process. The backend follows
the device: NCCL for CUDA, gloo for CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from pyro_backpass.learning.distributed import World

__all__ = ["launched_world", "under_torchrun"]


def under_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets the
    ``env://`` variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextmanager
def launched_world(device: torch.device, *, timeout_s: float = 1800.0) -> Iterator[World]:
    """The :class:`World` this command runs in; initialises (and at exit destroys) the default
    process group when launched by ``torchrun`` and none exists yet.

    :param device: where the command computes: ``cuda`` picks NCCL and this rank's GPU
        (``LOCAL_RANK``), anything else gloo.
    """
    if not under_torchrun() or dist.is_initialized():
        yield World.current()
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    try:
        yield World.current()
    finally:
        dist.destroy_process_group()
