"""Shared helpers of the benchmark scripts: the machine's description, timing, the model's
bottom-up activations of one image."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
# A file of the smoke preset's trained model: ``learned_model(smoke=True)`` loads it instead of
# training its own (the test suite trains it once per worker, tests/benchmarks/conftest.py).
SMOKE_MODEL_ENV = "PYRO_BACKPASS_SMOKE_MODEL"


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


def interleaved_median_times(
    fns: dict[str, Callable[[], object]], *, repeats: int, device: torch.device | None = None
) -> dict[str, float]:
    """:func:`median_time` of several functions, their calls interleaved (one warm-up call of
    each, then ``repeats`` rounds of one call each): on a shared machine whose load drifts
    from minute to minute, both sides of a ratio then see the same load."""

    def call(fn) -> float:
        t = time.perf_counter()
        fn()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for fn in fns.values():
        call(fn)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(call(fn))
    return {name: statistics.median(v) for name, v in times.items()}


def learned_model(*, smoke: bool, path: Path | None = None):
    """The model a learning benchmark measures, and how to name it in the results: a tiny one
    trained by the ``smoke`` preset (seconds, for tests), the file at ``path``, or the shipped
    ``GenerativeModel.default()``. It must carry its backbone."""
    import tempfile

    from pyro_backpass import GenerativeModel
    from pyro_backpass.learning import PRESETS, train_model

    if smoke and os.environ.get(SMOKE_MODEL_ENV):  # the test suite's one smoke model
        gm, name = GenerativeModel.load(os.environ[SMOKE_MODEL_ENV]), "smoke"
    elif smoke:
        with tempfile.TemporaryDirectory() as tmp:
            gm, name = train_model(PRESETS["smoke"], out_dir=tmp, progress=False), "smoke"
    elif path is not None:
        gm, name = GenerativeModel.load(path), str(path)
    else:
        gm, name = GenerativeModel.default(), "GenerativeModel.default()"
    if gm.backbone is None:
        raise SystemExit(f"{name}: the model has no backbone attached (its file names none)")
    return gm, name


def hidden_bu(gm, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """The backbone's activations of one ``(3, H, W)`` image at the model's hidden levels,
    each ``(1, C, h, w)``: the ``bu`` a backward pass of that image takes."""
    acts = gm.backbone(image[None])
    return {k: v for k, v in acts.items() if k in gm.hidden_levels}


def rendered_objects(gm, n: int, split: str, *, scale: tuple[float, float] | None = None):
    """``n`` lone rendered objects per category of ``gm`` from ``split``'s seeds (default
    render scale unless ``scale``): images ``(N, 3, H, W)``, masks ``(N, H, W)``, labels
    ``(N,)``, category by category."""
    from pyro_backpass import RenderedObjects
    from pyro_backpass.data import split_seed

    images, masks, labels = [], [], []
    kw = {} if scale is None else {"scale": scale}
    for c, name in enumerate(gm.categories):
        objects = RenderedObjects(name, n, seed=split_seed(split), **kw)
        for i in range(n):
            image, mask = objects[i]
            images.append(image), masks.append(mask), labels.append(c)
    return torch.stack(images), torch.stack(masks), torch.tensor(labels)


def panel_figure(rows: list[list[tuple[torch.Tensor, str]]], path: Path) -> None:
    """A grid of images, one list of ``(image, title)`` panels a row (an image is ``(H, W, 3)``
    RGB or ``(H, W)`` shown in grey), written atomically as a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyro_backpass.files import atomic_write

    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(2 * cols, 2 * len(rows)), squeeze=False)
    for r, panels in enumerate(rows):
        for c, (x, title) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(x.float().numpy(), **({} if x.dim() == 3 else {"cmap": "gray"}))
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(title, fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


def records_in_workers(fn, scenes: int, workers: int, job) -> list[dict]:
    """``fn``'s records (dicts with a ``"scene"`` index) of scenes ``0 … scenes - 1``, split
    round robin between ``workers`` processes (in this one when there is one job);
    ``job(indices, first)`` makes each process's argument (``first``: the one that shows
    progress). Sorted by scene."""
    parts = [list(range(w, scenes, workers)) for w in range(workers)]
    jobs = [job(p, w == 0) for w, p in enumerate(parts) if p]
    if len(jobs) == 1:
        records = fn(jobs[0])
    else:
        with ProcessPoolExecutor(len(jobs)) as pool:
            records = [r for part in pool.map(fn, jobs) for r in part]
    return sorted(records, key=lambda r: r["scene"])
