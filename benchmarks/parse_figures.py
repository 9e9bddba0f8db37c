"""Figures of scene parses for the README: real photographs (scikit-image's and matplotlib's
sample photos, shipped with those packages) parsed with the shipped model at two scales, and
the demo's figures of held-out rendered scenes.

One thread. Writes ``benchmarks/results/parse_photos.png``, ``parse_photos.json`` (the
parse records) and the demo figures in ``benchmarks/results/parse_demo/``.

Usage: ``python benchmarks/parse_figures.py``
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine  # noqa: E402


def photos() -> dict:
    import matplotlib.cbook as cbook
    from PIL import Image
    from skimage import data

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = Image.open(f)
        hopper.load()
    return {"rocket": data.rocket(), "chelsea": data.chelsea(), "grace_hopper": hopper,
            "camera (grey)": data.camera()}  # fmt: skip


def main() -> None:
    torch.set_num_threads(1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyro_backpass import GenerativeModel, parse_record, parse_scene, plot_overlay
    from pyro_backpass.cli import main as cli
    from pyro_backpass.files import atomic_write, atomic_write_json

    gm = GenerativeModel.default()
    images = photos()
    fig, axes = plt.subplots(len(images), 4, figsize=(10, 2.6 * len(images)), squeeze=False)
    records = {"machine": machine(), "scales": [1.0, 2.0], "max_objects": 3, "parses": {}}
    for row, (name, image) in zip(axes, images.items(), strict=True):
        start = time.perf_counter()
        p = parse_scene(gm, image, scales=(1.0, 2.0), max_objects=3)
        secs = time.perf_counter() - start
        records["parses"][name] = {**parse_record(p, image_id=name), "seconds": round(secs, 1)}
        plot_overlay(p.image, None, title=f"{name} ({secs:.0f} s)", ax=row[0])
        for k, ax in enumerate(row[1:]):
            if k < len(p.instances):
                inst = p.instances[k]
                plot_overlay(p.image, inst.mask, outline=inst.amodal_mask, ax=ax,
                             title=f"step {k + 1}: {inst.category}, scale {inst.scale}\n"
                                   f"LLR {inst.llr:.0f}")  # fmt: skip
            else:
                ax.axis("off")
        print(f"{name}: {[i.category for i in p.instances]} ({secs:.1f} s)", flush=True)
    fig.suptitle("real photographs, shipped model (trained on rendered objects only), "
                 "scales 1 and 2", fontsize=10)  # fmt: skip
    fig.tight_layout()

    def save(tmp: Path) -> None:
        fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png")

    atomic_write(RESULTS / "parse_photos.png", save)
    atomic_write_json(RESULTS / "parse_photos.json", records)
    cli(["demo", "--out", str(RESULTS / "parse_demo"), "--device", "cpu"])


if __name__ == "__main__":
    main()
