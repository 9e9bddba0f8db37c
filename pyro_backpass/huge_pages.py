"""Transparent huge pages for large CPU tensors: PyTorch's own ``THP_MEM_ALLOC_ENABLE`` switch.

The backward pass allocates tensors of tens of megabytes per call (φ of all K components of a
level: 44 MB for ``conv1_1`` of the default model at batch 32). Above glibc's mmap threshold
every such tensor is fresh memory from the kernel, and each of its 4 kB pages costs a page fault
when first written: measured ~37,000 faults (150 MB) per ``greedy_map`` call at the default
size, a quarter of the call's time on one CPU thread (``benchmarks/backward_pass.py``'s
``no_huge_pages`` row). PyTorch's CPU allocator can ask for 2 MB pages for buffers of 2 MB and
more (``madvise(MADV_HUGEPAGE)``, when ``THP_MEM_ALLOC_ENABLE=1``), which cuts those faults
~500-fold.

PyTorch reads the variable once, at its first CPU allocation, so importing ``pyro_backpass``
sets it to ``1`` unless it is set already (``THP_MEM_ALLOC_ENABLE=0`` keeps PyTorch's default)
— effective when ``pyro_backpass`` is imported before the process allocates its first tensor,
as the CLI and the benchmarks do. It changes speed, never values. Where the kernel's transparent
huge pages are ``never`` (``/sys/kernel/mm/transparent_hugepage/enabled``) it does nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ENV", "huge_pages_requested", "kernel_huge_pages", "request_huge_pages"]

ENV = "THP_MEM_ALLOC_ENABLE"
_SYSFS = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def request_huge_pages() -> None:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` unless the environment has it already (any value)."""
    os.environ.setdefault(ENV, "1")


def huge_pages_requested() -> bool:
    """Whether the environment asks PyTorch for huge pages (``THP_MEM_ALLOC_ENABLE=1``)."""
    return os.environ.get(ENV) == "1"


def kernel_huge_pages() -> str:
    """The kernel's transparent-huge-page mode (``always``, ``madvise``, ``never``), or
    ``unknown`` where sysfs does not say (not Linux)."""
    try:
        text = _SYSFS.read_text()
    except OSError:
        return "unknown"
    chosen = [word for word in text.split() if word.startswith("[")]
    return chosen[0].strip("[]") if chosen else "unknown"


request_huge_pages()  # on import: the package's __init__ imports this module first
