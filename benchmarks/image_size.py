"""Measure what the default image size costs and buys, to choose ``DEFAULT_SIZE``.

For each candidate size S (64-128 px) it records:

- render time per object image and per 3-object scene (2 targets + 1 distractor + clutter);
- how big an object is in such a scene: median amodal area and longest box side in pixels,
  and that side in cells of a VGG-style pool4 map (stride 16), which is where the generative
  model places objects;
- whether objects that size are recognisable: held-out accuracy of a tiny CNN trained for a
  fixed budget on objects rendered at that pixel size (the median in-scene longest side).

Run: ``python benchmarks/image_size.py`` (about two minutes on 2 cores); ``--smoke`` is a
seconds-long run that writes nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from pyro_backpass import CATEGORIES, ObjectDataset, RenderedObjects, make_scene
from pyro_backpass.files import atomic_write_json

RESULTS = Path(__file__).parent / "results" / "image_size.json"


def _time_objects(size: int, n: int) -> float:
    start = time.perf_counter()
    for k, c in enumerate(CATEGORIES):
        ds = RenderedObjects(c, n, size=size, seed=100 + k)
        for i in range(n):
            ds[i]
    return (time.perf_counter() - start) / (n * len(CATEGORIES))


def _scene_stats(size: int, n: int) -> dict:
    areas, visible, sides, times = [], [], [], []
    for s in range(n):
        start = time.perf_counter()
        scene = make_scene(targets=("airplane", "airplane"), distractors=1, size=size, seed=s)
        times.append(time.perf_counter() - start)
        for inst in scene.instances:
            y0, x0, y1, x1 = inst.amodal_box
            areas.append(int(inst.amodal_mask.sum()))
            visible.append(int(inst.mask.sum()))
            sides.append(max(y1 - y0, x1 - x0))
    side = statistics.median(sides)
    return {
        "scene_ms": 1000 * statistics.mean(times),
        "object_amodal_area_px_median": statistics.median(areas),
        "object_visible_area_px_median": statistics.median(visible),
        "object_longest_side_px_median": side,
        "object_longest_side_pool4_cells": side / 16,
    }


def _tiny_cnn(classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(128, classes),
    )  # fmt: skip


def _stack(ds: ObjectDataset) -> tuple[torch.Tensor, torch.Tensor]:
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x[0] for x in items]), torch.tensor([x[2] for x in items])


def _recognisability(pixels: int, n_train: int, n_test: int, epochs: int) -> float:
    """Held-out accuracy of a tiny CNN on objects whose image side is ``pixels``."""
    torch.manual_seed(0)
    x, y = _stack(ObjectDataset(n_train, size=pixels, seed=11))
    xt, yt = _stack(ObjectDataset(n_test, size=pixels, seed=12))
    net = _tiny_cnn(len(CATEGORIES))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    steps = epochs * -(-len(x) // 32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for b in perm.split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        return float((net(xt).argmax(1) == yt).float().mean())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 80, 96, 128])
    parser.add_argument("--smoke", action="store_true", help="tiny run, for the test suite")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    n_obj, n_scene, n_train, n_test, epochs = (
        (2, 2, 20, 10, 1) if args.smoke else (20, 20, 1500, 500, 8)
    )
    out = args.out if args.out is not None else (None if args.smoke else RESULTS)
    rows = []
    for size in args.sizes:
        row = {"size": size, "object_ms": 1000 * _time_objects(size, n_obj)}
        row.update(_scene_stats(size, n_scene))
        pixels = max(16, int(round(row["object_longest_side_px_median"])))
        row["classifier_input_px"] = pixels
        row["tiny_cnn_heldout_accuracy"] = _recognisability(pixels, n_train, n_test, epochs)
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
        rows.append(row)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, torch threads 2",
        "scene": "targets=('airplane', 'airplane'), distractors=1, clutter=True",
        "classifier": f"tiny 3-conv CNN with batch norm, {n_train} train / {n_test} held-out "
        f"objects, {epochs} epochs, Adam one-cycle 3e-3",
        "rows": rows,
    }
    if out is not None:
        atomic_write_json(out, result)
    return result


if __name__ == "__main__":
    main()
