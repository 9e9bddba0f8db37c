"""Draw a grid of rendered objects (one row per category) and a few scenes with their visible
instance masks, for the README: ``benchmarks/results/rendered_grid.png``.

Run: ``python benchmarks/render_grid.py`` (a few seconds); ``--smoke`` draws a smaller grid.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pyro_backpass import CATEGORIES, DEFAULT_SIZE, RenderedObjects, make_scene  # noqa: E402
from pyro_backpass.files import atomic_write  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "rendered_grid.png"
# A fixed palette for instance masks (targets and distractors), clutter in grey.
PALETTE = torch.tensor(
    [
        [1.0, 0.2, 0.2],
        [0.2, 0.5, 1.0],
        [0.2, 0.9, 0.3],
        [1.0, 0.8, 0.1],
        [0.8, 0.3, 1.0],
        [0.1, 0.9, 0.9],
        [1.0, 0.5, 0.0],
        [0.6, 0.6, 0.2],
    ]
)


def _instance_map(scene) -> torch.Tensor:
    """``(H, W, 3)``: each instance's visible mask in its colour, clutter grey, else black."""
    out = torch.zeros(*scene.image.shape[1:], 3)
    out[scene.clutter_mask] = 0.35
    for k, inst in enumerate(scene.instances):
        out[inst.mask] = PALETTE[k % len(PALETTE)]
    return out


def main(argv: list[str] | None = None) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--per-row", type=int, default=10)
    parser.add_argument("--scenes", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny grid, for the test suite")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    per_row, n_scenes = (3, 1) if args.smoke else (args.per_row, args.scenes)
    out = args.out if args.out is not None else (None if args.smoke else RESULTS)

    rows = len(CATEGORIES) + 2
    fig, axes = plt.subplots(rows, per_row, figsize=(per_row * 1.1, rows * 1.15), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, c in enumerate(CATEGORIES):
        ds = RenderedObjects(c, per_row, size=args.size, seed=2)
        for i in range(per_row):
            axes[r, i].imshow(ds[i][0].permute(1, 2, 0).numpy())
        axes[r, 0].set_title(c, fontsize=8, loc="left")
    for s in range(min(n_scenes, per_row // 2 or 1)):
        scene = make_scene(seed=s, size=args.size, occlusion=(0.1, 0.4))
        names = ", ".join(i.category for i in scene.instances)
        ax_img, ax_mask = axes[-2, 2 * s], axes[-2, 2 * s + 1]
        ax_img.imshow(scene.image.permute(1, 2, 0).numpy())
        ax_img.set_title(names, fontsize=5, loc="left")
        ax_mask.imshow(_instance_map(scene).numpy())
        for k, inst in enumerate(scene.instances[:2]):
            axes[-1, 2 * s + k].imshow(inst.image_alone.permute(1, 2, 0).numpy())
            axes[-1, 2 * s + k].set_title(f"alone: {inst.category}", fontsize=5, loc="left")
    fig.suptitle(
        f"rendered objects, {args.size} px (one row per category); scenes: image, visible "
        "instance masks (clutter grey), and two instances alone",
        fontsize=8,
    )
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.92, wspace=0.08, hspace=0.35)
    if out is not None:
        atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out


if __name__ == "__main__":
    main()
