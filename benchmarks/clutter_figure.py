"""Issue #10's figure per lever: for the same three test scenes, the input, the top-down
prediction φ at three levels, F̂ at the mask's level and the mask of the first backward pass
(category clamped to airplane), one block of rows per lever (``clutter_levers.py``'s names).

Writes ``benchmarks/results/clutter_levers/figure.png``.

Usage: ``python benchmarks/clutter_figure.py [--model PATH] [--levers base bgfit ...]
[--verifier PATH]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from clutter_levers import apply_lever  # noqa: E402
from common import RESULTS, learned_model  # noqa: E402

from pyro_backpass import DescentVerifier, Scenes, greedy_map, verified_map  # noqa: E402
from pyro_backpass.data import split_seed  # noqa: E402
from pyro_backpass.files import atomic_write  # noqa: E402

PHI_LEVELS = ("pool3", "pool1", "conv1_1")


def phi_at(gm, result, name: str) -> torch.Tensor:
    """``(H, W)``: max over channels of the top-down prediction φ of level ``name``."""
    above = gm.hidden_levels[gm.hidden_levels.index(name) + 1]
    a = result.assignment
    phi = gm.steps[name].phi(result.td[above], a[f"gamma_{name}"], a[f"delta_{name}"])
    return phi[0].amax(dim=0)


def draw_row(axes, row: int, panels: list[torch.Tensor], titles: list[str]) -> None:
    """One row of a lever figure: the input in colour, the maps in magma, titles on row 0."""
    for c, (panel, title) in enumerate(zip(panels, titles, strict=True)):
        ax = axes[row, c]
        ax.imshow(panel.numpy(), cmap=None if c == 0 else "magma")
        ax.set_xticks([]), ax.set_yticks([])
        if row == 0:
            ax.set_title(title, fontsize=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--levers", nargs="+", default=["base"])
    parser.add_argument("--scenes", type=int, default=3)
    parser.add_argument("--name", default=None, help="the model's name in the title")
    parser.add_argument("--verifier", type=Path, default=None,
                        help="the verified lever's verifier file (default: shipped)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "clutter_levers" / "figure.png")
    args = parser.parse_args()
    verifier = None if args.verifier is None else DescentVerifier.load(args.verifier)
    torch.set_num_threads(1)
    gm, model_name = learned_model(smoke=args.smoke, path=args.model)
    levels = [n for n in PHI_LEVELS if n in gm.hidden_levels[:-1]]
    scenes = list(Scenes(args.scenes, seed=split_seed("test")))
    mask_level = "conv1_1" if "conv1_1" in gm.hidden_levels else gm.hidden_levels[0]
    cols = 1 + len(levels) + 2
    rows = len(args.levers) * len(scenes)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols, 1.8 * rows), squeeze=False)
    with torch.no_grad():
        for li, lever in enumerate(args.levers):
            model, _ = apply_lever(gm, lever)
            for si, scene in enumerate(scenes):
                r = li * len(scenes) + si
                acts = gm.backbone(scene.image[None])
                bu = {k: v for k, v in acts.items() if k in model.hidden_levels}
                if lever in ("verified", "verified2"):  # the (shipped) verifier's choice
                    result = verified_map(model, bu, category="airplane", verifier=verifier,
                                          lower=lever == "verified2")  # fmt: skip
                else:
                    result = greedy_map(model, bu, category="airplane")
                panels = [scene.image.permute(1, 2, 0)]
                panels += [phi_at(model, result, n) for n in levels]
                panels += [result.td[mask_level][0].amax(dim=0), result.mask[0].float()]
                titles = ["input"] + [f"φ {n}" for n in levels] + [f"F̂ {mask_level}", "mask"]
                draw_row(axes, r, panels, titles)
                axes[r, 0].set_ylabel(f"{lever}\nscene {si}", fontsize=7)
    fig.suptitle(f"First backward pass, category airplane; {args.name or model_name}", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
