"""The paper's Fig. 4 on the shipped model: samples with the hidden variables clamped from the
top down to a level, so that only the levels below it vary.

Row ``r`` clamps (γ, δ) of every level from the top down to ``CLAMP_DOWN_TO[r]`` (the values
of one reference sample) and draws the rest; the first row clamps nothing but the category.
Shows the image level (the model's top-down reconstruction of the input) on the mean path
(``noise=0``), where every difference comes from the unclamped γ and δ. Also records, per row,
which sites the samples share, as a check that exactly the clamped ones are fixed.

Writes ``benchmarks/results/clamped_samples.png`` and ``clamped_samples.json``.

Usage: ``python benchmarks/clamped_samples.py [--category airplane] [--n 6] [--smoke]``
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
from common import RESULTS, learned_model  # noqa: E402

from pyro_backpass import sample  # noqa: E402
from pyro_backpass.files import atomic_write, atomic_write_json  # noqa: E402

CLAMP_DOWN_TO = (None, "pool4", "pool3", "pool2", "pool1")


def clamped_rows(gm, category: str, n: int, seed: int) -> list[tuple[str, dict, object]]:
    """``(title, clamp, Sample)`` per row."""
    reference = sample(gm, 1, category=category, seed=seed, noise=0.0)
    rows = []
    for down_to in CLAMP_DOWN_TO:
        clamp = {}
        if down_to is not None and down_to in gm.hidden_levels:
            for name in reversed(gm.hidden_levels[gm.hidden_levels.index(down_to) :]):
                for kind in ("gamma", "delta"):
                    clamp[f"{kind}_{name}"] = int(reference.assignment[f"{kind}_{name}"][0])
        elif down_to is not None:
            continue
        s = sample(gm, n, category=category, clamp=clamp or None, seed=seed + 1, noise=0.0)
        if down_to is None:
            title = f"{category}: nothing else clamped"
        else:
            top = gm.hidden_levels[-1]
            title = (f"clamped {top} … {down_to} (γ_{top}={clamp[f'gamma_{top}']}, "
                     f"δ_{top}={clamp[f'delta_{top}']}, …); below varies")  # fmt: skip
        rows.append((title, clamp, s))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--category", default="airplane")
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "clamped_samples.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gm, model_name = learned_model(smoke=args.smoke, path=args.model)
    if args.category not in gm.categories:
        raise SystemExit(f"unknown category {args.category!r}; the model has {gm.categories}")
    rows = clamped_rows(gm, args.category, args.n, args.seed)
    fig, axes = plt.subplots(len(rows), args.n, figsize=(1.6 * args.n, 1.9 * len(rows)))
    shared = {}
    for r, (title, clamp, s) in enumerate(rows):
        img = s.td["image"].clamp(0, 1)  # (n, 3, H, W)
        for i in range(args.n):
            ax = axes[r, i]
            ax.imshow(img[i].permute(1, 2, 0).numpy())
            ax.set_xticks([]), ax.set_yticks([])
        axes[r, 0].set_title(title, fontsize=7, loc="left")
        fixed = sorted(site for site, v in s.assignment.items() if bool((v == v[0]).all()))
        shared[title] = {"clamped": sorted(clamp), "equal_in_all_samples": fixed}
    fig.suptitle(f"Samples of the shipped model along the mean path (noise = 0), {model_name}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    atomic_write(args.out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    atomic_write_json(args.out.with_suffix(".json"),
                      {"model": model_name, "category": args.category, "rows": shared})  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
