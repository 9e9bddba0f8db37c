"""``pyro-backpass demo``: the backward pass at work on the shipped model, with figures.

On ``GenerativeModel.default()`` (no download): a held-out cluttered scene (test-split seed)
parsed instance by instance — the input, each instance's reconstruction and mask in turn, and
the posterior-mode bars of every step (Fig. 5; red: modes that are true objects) — then the same
on a plain two-airplane scene, a top-down query ("leftmost", "the object on the right"), an
occlusion completion, an imagination ("an airplane in this cloud") and samples of the model
(Fig. 3–4). The shipped model is weak on clutter (README, Status): the figures show what it
does, not what one would wish.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # the demo writes files; never opens a window

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pyro_backpass.cli.arguments import DEVICE_HELP, add_command, any_device, output_dir  # noqa: E402
from pyro_backpass.data import RenderedObjects, make_scene, split_seed  # noqa: E402
from pyro_backpass.files import atomic_write  # noqa: E402
from pyro_backpass.inference.sampling import sample  # noqa: E402
from pyro_backpass.learning.offset_priors import fit_offset_priors  # noqa: E402
from pyro_backpass.learning.train import render_object_set  # noqa: E402
from pyro_backpass.model.generative_model import GenerativeModel  # noqa: E402
from pyro_backpass.parsing import Query, mode_label, run_parse  # noqa: E402
from pyro_backpass.viz.parse_plots import plot_instances, plot_mode_bars, plot_overlay  # noqa: E402
from pyro_backpass.viz.plotting import plot_samples  # noqa: E402

__all__ = ["add_parser", "run"]

DEMO_SEED = 7  # the scenes are split_seed("test", DEMO_SEED): never seen in training


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "demo", help="parse held-out scenes with the shipped model (figures)",
                    doc=__doc__)  # fmt: skip
    p.add_argument("--out", type=output_dir, default="figures/demo", help="output folder")
    p.add_argument("--device", type=any_device, default="auto", help=DEVICE_HELP)
    p.add_argument("--seed", type=int, default=DEMO_SEED, help="base seed of the test scenes")
    p.add_argument("--print-shapes", action="store_true", help="print the model's trace shapes")
    p.add_argument("--smoke", action="store_true", help="fewer steps and modes, for tests")
    p.set_defaults(func=run)


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    plt.close(fig)
    print(f"  wrote {path}")


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def _parse_figures(gm, parse, truth_masks, out: Path, name: str, title: str) -> None:
    """The instances in turn, and each step's mode bars (red: a mode matching a true object)."""
    fig, _ = plot_instances(
        parse.image, [i.reconstruction for i in parse.instances],
        [i.mask for i in parse.instances],
        [f"{i.category}\nscore {i.score:.2f}, LLR {i.llr:.0f}" for i in parse.instances],
        suptitle=f"{title}: {len(parse.instances)} instances, stop: {parse.stop_reason}",
    )  # fmt: skip
    _save(fig, out / f"{name}.png")
    steps = parse.instances
    if not steps:
        return
    fig, axes = plt.subplots(1, len(steps), figsize=(4.6 * len(steps), 3.6), squeeze=False)
    for ax, (k, inst) in zip(axes[0], enumerate(steps), strict=True):
        red = []
        if inst.mode_masks is not None:
            red = [j for j, m in enumerate(inst.mode_masks)
                   if any(_iou(m, t) >= 0.5 for t in truth_masks)]  # fmt: skip
        plot_mode_bars(inst.mode_scores, [mode_label(gm, a) for a, _ in inst.modes],
                       highlight=red, title=f"step {k + 1}: modes of pool4 (top level)",
                       ax=ax)  # fmt: skip
    fig.tight_layout()
    _save(fig, out / f"{name}_modes.png")


def run(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    # Parsing is many small ops: on the shared 2-core machine one thread ran the smoke demo in
    # 11 s where the default two took 108 s under load from other jobs.
    torch.set_num_threads(1)
    device = args.device
    gm = GenerativeModel.default().to(device)
    gm.backbone.to(device)
    top_k = 4 if args.smoke else 10
    steps = 2 if args.smoke else 4
    print(f"shipped model on {device}: levels {list(gm.hidden_levels)}, "
          f"categories {list(gm.categories)}")  # fmt: skip
    if args.print_shapes:
        small = GenerativeModel.random([2, "M"], num_components=2, image_size=4)
        print(small.format_shapes({"pool1": torch.rand(1, 2, 2, 2)}))
    seed = split_seed("test", args.seed)

    # 1. A held-out cluttered scene, parsed instance by instance.
    scene = make_scene(seed=(seed, 0))
    t = time.perf_counter()
    parse = run_parse(gm, scene.image, max_objects=steps, top_k=top_k, mode_masks=True)
    truth = [i.mask for i in scene.instances]
    print(f"cluttered scene ({', '.join(i.category for i in scene.instances)} + clutter): "
          f"{[i.category for i in parse.instances]}, stop: {parse.stop_reason} "
          f"({time.perf_counter() - t:.1f} s)")  # fmt: skip
    _parse_figures(gm, parse, truth, args.out, "parse_cluttered", "held-out cluttered scene")

    # 2. Two airplanes on a plain background.
    plain = make_scene(targets=("airplane", "airplane"), distractors=0, clutter=False,
                       occlusion=(0.0, 0.1), seed=(seed, 1))  # fmt: skip
    parse = run_parse(gm, plain.image, max_objects=steps, top_k=top_k, mode_masks=True)
    print(f"plain scene (2 airplanes): {[i.category for i in parse.instances]}, "
          f"stop: {parse.stop_reason}")  # fmt: skip
    _parse_figures(gm, parse, [i.mask for i in plain.instances], args.out, "parse_plain",
                   "two airplanes, plain background")  # fmt: skip

    # 3. Top-down queries: no retraining, priors and preferences on the first step.
    queries = [("leftmost", Query(prefer="leftmost")), ("object on the right",
               Query(location="right")), ("largest", Query(prefer="largest")),
               ("attend to 'car'", Query(category="car"))]  # fmt: skip
    fig, axes = plt.subplots(1, len(queries) + 1, figsize=(2.4 * (len(queries) + 1), 2.8))
    plot_overlay(plain.image, None, title="input", ax=axes[0])
    for ax, (words, q) in zip(axes[1:], queries, strict=True):
        p = run_parse(gm, plain.image, max_objects=1, query=q, top_k=top_k, threshold=-math.inf)
        inst = p.instances[0]
        plot_overlay(plain.image, inst.mask, title=f'"{words}"\n→ {inst.category}', ax=ax)
    fig.suptitle("top-down queries: the first instance of each", fontsize=9)
    _save(fig, args.out / "queries.png")

    # 4. Occlusion completion: a grey bar over an airplane, given as the occluder.
    image, mask = RenderedObjects("airplane", 1, seed=(seed, 2))[0]
    cols = torch.nonzero(mask)[:, 1]
    cut = int(cols.float().median())
    occ = torch.zeros_like(mask)
    occ[:, cut : int(cols.max()) + 1] = True
    occluded = image.clone()
    occluded[:, occ] = 0.5
    free = run_parse(gm, occluded, max_objects=1, top_k=top_k, threshold=-math.inf)
    done = run_parse(gm, occluded, max_objects=1, top_k=top_k, threshold=-math.inf,
                     query=Query(occluder=occ, category="airplane"))  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(10, 2.8))
    plot_overlay(occluded, None, title="input (grey bar: occluder)", ax=axes[0])
    plot_overlay(occluded, free.instances[0].amodal_mask,
                 title=f"no occluder given\nIoU with whole object "
                       f"{_iou(free.instances[0].amodal_mask, mask):.2f}", ax=axes[1])  # fmt: skip
    plot_overlay(occluded, done.instances[0].amodal_mask, outline=mask,
                 title=f"occluder given: amodal mask\nIoU with whole object "
                       f"{_iou(done.instances[0].amodal_mask, mask):.2f}", ax=axes[2])  # fmt: skip
    plot_overlay(done.instances[0].reconstruction, None, title="completed reconstruction",
                 normalize=True, ax=axes[3])  # fmt: skip
    fig.suptitle("occlusion completion (cyan: the true whole object)", fontsize=9)
    _save(fig, args.out / "occlusion.png")
    print(f"occlusion: amodal IoU {_iou(free.instances[0].amodal_mask, mask):.2f} without, "
          f"{_iou(done.instances[0].amodal_mask, mask):.2f} with the occluder given")  # fmt: skip

    # 5. Imagination: a cloud, and the airplane (and boat) the model imagines in it.
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    cloud = ((((yy - 30) / 11) ** 2 + ((xx - 32) / 24) ** 2) < 1).float()
    cloud = torch.nn.functional.avg_pool2d(cloud[None, None], 5, 1, 2, count_include_pad=False)[0]
    cloud_img = torch.cat([0.45 + 0.5 * cloud, 0.62 + 0.35 * cloud, 0.9 + 0.1 * cloud]).clamp(0, 1)
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8))
    plot_overlay(cloud_img, None, title="a cloud", ax=axes[0])
    for ax, cat in zip(axes[1:], ("airplane", "boat"), strict=True):
        p = run_parse(gm, cloud_img, query=Query(category=cat, imagine=True), top_k=top_k)
        plot_overlay(p.instances[0].reconstruction, None, outline=p.instances[0].amodal_mask,
                     normalize=True, title=f"imagine: {cat}\n(LLR {p.instances[0].llr:.0f})",
                     ax=ax)  # fmt: skip
    fig.suptitle("imagination: the category clamped on an ambiguous input", fontsize=9)
    _save(fig, args.out / "imagination.png")

    # 6. Samples of the model (Fig. 3) and with the top level clamped (Fig. 4).
    top = gm.hidden_levels[-1]
    # δ drawn where lone training objects were (#10: with priors from 100 objects a category,
    # 26 % → 47 % of samples recognised; 20 here keep the demo short).
    per = 4 if args.smoke else 20
    images, _, labels = render_object_set(gm.categories, per, backbone=gm.backbone,
                                          seed=split_seed("train", args.seed))  # fmt: skip
    priors = fit_offset_priors(gm, images, labels)
    s = sample(gm, 10, category=torch.arange(10) % len(gm.categories), priors=priors,
               noise=0.0, seed=0)  # fmt: skip
    titles = [mode_label(gm, {k: int(v[i]) for k, v in s.assignment.items()}) for i in range(10)]
    fig, _ = plot_samples(s, titles=[t.replace(" γ", "\nγ") for t in titles])
    fig.suptitle(f"samples (mean path; δ priors from {per} lone objects a category)",
                 fontsize=9)  # fmt: skip
    _save(fig, args.out / "samples.png")
    s = sample(gm, 8, category="airplane", clamp={f"gamma_{top}": 0, f"delta_{top}": 12},
               seed=1)  # fmt: skip
    fig, _ = plot_samples(s)
    fig.suptitle(f"airplane samples, gamma_{top} and delta_{top} clamped", fontsize=9)
    _save(fig, args.out / "clamped_samples.png")
    print(f"demo done in {time.perf_counter() - start:.1f} s; figures in {args.out}")
