"""Shared helpers of the benchmark scripts: the machine's description, timing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    """CPU model, core count, torch version (and the GPU when one is used)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # The machine is shared with other jobs while measuring: compare only ratios in one run.
    desc = f"{cpu}, {os.cpu_count()} logical CPUs (shared), torch {torch.__version__}"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name()}"
    return desc


def median_time(
    fn: Callable[[], object], *, repeats: int, device: torch.device | None = None
) -> float:
    """Median wall time of ``repeats`` calls (after one warm-up call); on CUDA each call is
    synchronised, so its time includes the kernels it queued."""

    def call() -> None:
        fn()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize()

    call()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
