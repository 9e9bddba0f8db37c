"""``pyro-backpass demo``: the core on a small random model, with figures.

Samples from the model (Fig. 3), samples with the top level's hidden variables clamped (Fig. 4),
one backward pass on an observation drawn from the model with its reconstruction and mask, and
the log-joint bars of the top-k hypotheses (Fig. 5). The trained default model of the learning
issue will replace the random one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # the demo writes files; never opens a window

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pyro_backpass.cli.arguments import (  # noqa: E402
    DEVICE_HELP,
    add_command,
    any_device,
    note,
    output_dir,
    positive_int,
)
from pyro_backpass.files import atomic_write  # noqa: E402
from pyro_backpass.inference.greedy import greedy_map  # noqa: E402
from pyro_backpass.inference.sampling import sample  # noqa: E402
from pyro_backpass.model.generative_model import GenerativeModel  # noqa: E402
from pyro_backpass.viz.plotting import plot_modes, plot_reconstruction, plot_samples  # noqa: E402

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "demo", help="sample, run the backward pass and plot (writes figures)",
                    doc=__doc__)  # fmt: skip
    p.add_argument("--out", type=output_dir, default="figures/demo", help="output folder")
    p.add_argument("--device", type=any_device, default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=0, help="random seed of the model and samples")
    p.add_argument("--top-k", type=positive_int, default=12, help="hypotheses in the bar plot")
    p.add_argument("--print-shapes", action="store_true", help="print the model's trace shapes")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for tests")
    p.set_defaults(func=run)


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    print(f"  wrote {path}")


def run(args: argparse.Namespace) -> None:
    device = args.device
    cfg, size, k = ([4, "M"], 8, 2) if args.smoke else ([8, "M", 16, "M"], 32, 4)
    gm = GenerativeModel.random(
        cfg, num_components=k, num_categories=2, image_size=size, seed=args.seed
    ).to(device)
    print(f"random model on {device}: cfg={cfg}, image {size}px, K={k}, categories {gm.categories}")
    if args.print_shapes:
        small = GenerativeModel.random([2, "M"], num_components=2, image_size=4)
        print(small.format_shapes({"pool1": torch.rand(1, 2, 2, 2)}))

    top = gm.hidden_levels[-1]
    samples = sample(gm, 8 if args.smoke else 16, seed=args.seed)
    cats, gammas = samples.assignment["category"], samples.assignment[f"gamma_{top}"]
    titles = [f"c{int(c)} γ{int(g)}" for c, g in zip(cats, gammas, strict=True)]
    fig, _ = plot_samples(samples, titles=titles)
    fig.suptitle("samples from the prior (image level)")
    _save(fig, args.out / "samples.png")

    clamped = sample(gm, 8, category=0, clamp={f"gamma_{top}": 0, f"delta_{top}": 0},
                     seed=args.seed + 1)  # fmt: skip
    fig, _ = plot_samples(clamped)
    fig.suptitle(f"samples with category, gamma_{top}, delta_{top} clamped")
    _save(fig, args.out / "clamped_samples.png")

    truth = sample(gm, 1, observe=True, seed=args.seed + 2)
    start = time.perf_counter()
    top_k = min(args.top_k, 2 * gm.site_sizes[f"delta_{top}"])
    if top_k < args.top_k:
        note(f"--top-k {args.top_k} capped to {top_k} (the bars show at most that many)")
    result = greedy_map(gm, truth.bu, top_k=top_k)
    elapsed = time.perf_counter() - start
    same = sum(int(result.assignment[s][0]) == int(truth.assignment[s][0]) for s in gm.sites)
    print(
        f"backward pass: {elapsed * 1e3:.1f} ms, log-joint {result.log_joint[0].item():.1f}; "
        f"{same}/{len(gm.sites)} hidden variables equal the sampled truth"
    )
    fig, _ = plot_reconstruction(truth.bu["image"], result, normalize=True)
    _save(fig, args.out / "map_reconstruction.png")
    fig, ax = plot_modes(result, label_sites=["category", f"gamma_{top}", f"delta_{top}"])
    ax.set_title("top-k hypotheses of the top level, each completed greedily")
    _save(fig, args.out / "topk.png")
