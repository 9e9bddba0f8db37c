"""Block sizes for element-wise work, chosen from the CPU's cache size rather than a constant.

The hypothesis scores run about ten element-wise passes over each block of
(images × hypotheses × elements). A block that stays in cache across those passes costs the
arithmetic alone; one that does not is bound by memory traffic (measured on the default model's
levels: ~1 ns per element-hypothesis at 256 k-element blocks, ~4 ns at 4 M). Blocks much smaller
than the L2 cache lose instead to the fixed cost of each eager operation (~3 µs), so the target
is this core's share of L2 + L3, divided among the block's live buffers.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

__all__ = ["block_elements", "cache_bytes_per_core"]

# What a block may use of this core's cache share (buffers of the block's size that are live at
# once: two scratch, three φ-side planes, the image side and the result; with headroom).
_LIVE_BUFFERS = 16
_FALLBACK_BYTES = 8 * 2**20  # when sysfs says nothing (non-Linux): a typical L2 + L3 share
_MIN_BLOCK, _MAX_BLOCK = 2**14, 2**20


def _parse_size(text: str) -> int:
    text = text.strip().upper()
    unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * unit


def _cpus_in(cpu_list: str) -> int:
    count = 0
    for part in cpu_list.strip().split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return max(1, count)


@functools.cache
def cache_bytes_per_core() -> int:
    """This core's share of its unified/data caches from L2 up (bytes), read from sysfs."""
    total = 0
    try:
        for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            if level < 2 or kind == "Instruction":
                continue
            shared = _cpus_in((index / "shared_cpu_list").read_text())
            total += _parse_size((index / "size").read_text()) // shared
    except (OSError, ValueError):
        total = 0
    return total or _FALLBACK_BYTES


def block_elements(itemsize: int = 4) -> int:
    """Elements per block of element-wise work for values of ``itemsize`` bytes.

    ``PYRO_BACKPASS_BLOCK_ELEMENTS`` overrides it (for measurements).
    """
    override = os.environ.get("PYRO_BACKPASS_BLOCK_ELEMENTS")
    if override:
        return max(1, int(override))
    n = cache_bytes_per_core() // (itemsize * _LIVE_BUFFERS)
    return max(_MIN_BLOCK, min(_MAX_BLOCK, n))
