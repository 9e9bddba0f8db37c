"""Why are the model's samples not classified as their category (issue #10's target ≥ 90 %)? A
ladder from real objects to free samples, each rung classified by the model's backbone (the
plain default backbone for ``GenerativeModel.default()``, the classifier the target names).

Per category, ``--n`` test-split objects (default render scale) and as many samples:

- ``objects``: the rendered objects themselves (on their plain background);
- ``objects_on_black``: each object times its mask, zero elsewhere — the image level's hard-EM
  target, i.e. what the model is trained to generate; ``objects_on_grey``: the same on 0.5 grey;
- ``pass_reconstruction``: F̂ of the image level from the backward pass on the object
  (category given);
- ``own_mean_path``: the mean top-down path (each level exactly φ of the one above, no
  bottom-up input) with the pass's own assignment on every level;
- ``own_from_<level>``: the same path started from the object's own masked activations at
  ``level`` (the hard-EM target) instead of the top: which step of the path loses the
  category (``own_from_conv1_1`` is one decoding step from the truth);
- ``own_top_then_sampled``: samples with the top level's (γ, δ) clamped to the pass's, the
  levels below drawn from the model's priors;
- ``centred_samples``: samples with the top level's δ clamped to the centre offset (where
  the training objects sit), everything else drawn;
- ``samples``: the model's free samples (``benchmarks/learning.py``'s number).

The sampled rungs are measured at ``noise`` 0 (the mean path) and 1, each also ``on_grey``:
composited on 0.5 grey through the model's own mask of the sample (the backbone classifies
masked real objects on black worse than on grey; the row pairs say how much of the gap that
is). Writes ``benchmarks/results/sample_diagnosis.json`` and a figure of the image-level rungs
for three objects per category (``sample_diagnosis.png``). One thread.

Usage: ``python benchmarks/sample_diagnosis.py [--model PATH] [--n 100] [--smoke]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from clutter_levers import use_offset_priors  # noqa: E402
from common import RESULTS, learned_model, machine, rendered_objects  # noqa: E402

from pyro_backpass import GenerativeModel, greedy_map, sample  # noqa: E402
from pyro_backpass.files import atomic_write, atomic_write_json  # noqa: E402
from pyro_backpass.inference import object_mask  # noqa: E402
from pyro_backpass.learning import object_targets  # noqa: E402
from pyro_backpass.model import shift_select  # noqa: E402

GREY = 0.5


def mean_path_levels(gm: GenerativeModel, labels: torch.Tensor,
                     assignment: dict) -> dict[str, torch.Tensor]:  # fmt: skip
    """Every hidden level of the mean top-down path, level → ``(N, C, H, W)``: φ of φ from the
    category down, every level's (γ, δ) from ``assignment``, with no bottom-up input
    (differentiable in the kernels)."""
    upper, path = labels, {}
    for name in reversed(gm.hidden_levels):
        step = gm.steps[name]
        phi = step.phi_per_sample(upper, assignment[f"gamma_{name}"])
        upper = path[name] = shift_select(phi, step.offsets, assignment[f"delta_{name}"])
    return path


def mean_path_from(gm: GenerativeModel, level: str, start: torch.Tensor,
                   assignment: dict) -> torch.Tensor:  # fmt: skip
    """``(N, 3, H, W)``: the mean top-down path's image level from ``start`` ``(N, C, h, w)``
    given as ``level``'s activations, every level below it φ of the one above with its (γ, δ)
    from ``assignment``."""
    names = list(gm.hidden_levels)
    upper = start
    for name in reversed(names[: names.index(level)]):
        step = gm.steps[name]
        phi = step.phi_per_sample(upper, assignment[f"gamma_{name}"])
        upper = shift_select(phi, step.offsets, assignment[f"delta_{name}"])
    return upper


def mean_path(gm: GenerativeModel, labels: torch.Tensor, assignment: dict) -> torch.Tensor:
    """``(N, 3, H, W)``: the image level of :func:`mean_path_levels`."""
    return mean_path_levels(gm, labels, assignment)["image"]


def on_grey(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    m = masks[:, None].to(images.dtype)
    return images * m + GREY * (1 - m)


@torch.no_grad()
def ladder(gm: GenerativeModel, n: int) -> tuple[dict, dict]:
    """The rungs (see the module docstring): rung → per-category share classified as its
    category, and the image-level pictures for the figure (rung → ``(N, 3, H, W)``)."""
    bb = gm.backbone
    images, masks, labels = rendered_objects(gm, n, "test")
    top = gm.hidden_levels[-1]
    centre = gm.offsets[top].index((0, 0))

    def share(x: torch.Tensor) -> list[float]:
        right = bb.predict(x.clamp(0, 1)) == labels
        return [float(right[labels == c].float().mean()) for c in range(len(gm.categories))]

    acts = bb(images)
    bu = {k: v for k, v in acts.items() if k in gm.hidden_levels}
    passes = greedy_map(gm, bu, category=labels)
    pictures = {
        "objects": images,
        "objects_on_black": images * masks[:, None].to(images.dtype),
        "pass_reconstruction": passes.td["image"],
        "own_mean_path": mean_path(gm, labels, passes.assignment),
    }
    rows = {name: share(x) for name, x in pictures.items()}
    rows["objects_on_grey"] = share(on_grey(images, masks))
    # The generator's ladder: the mean path from the object's own (masked) activations at a
    # level down, the pass's (γ, δ) below it — which step of the path loses the category?
    targets = object_targets(bb, images, masks)
    for level in gm.hidden_levels[1:]:
        rows[f"own_from_{level}"] = share(mean_path_from(gm, level, targets[level],
                                                         passes.assignment))  # fmt: skip
    own_top = {f"gamma_{top}": passes.assignment[f"gamma_{top}"],
               f"delta_{top}": passes.assignment[f"delta_{top}"]}  # fmt: skip
    for rung, clamp in (("own_top_then_sampled", own_top),
                        ("centred_samples", {f"delta_{top}": centre}),
                        ("samples", None)):  # fmt: skip
        for noise in (0.0, 1.0):
            s = sample(gm, labels.numel(), category=labels, clamp=clamp, seed=0, noise=noise)
            image = s.td["image"].clamp(0, 1)
            rows[f"{rung}_noise{noise:g}"] = share(image)
            # a sample has no input: a readout that reads one reads the sample's own F̂ in
            # its place (as where nothing is observed)
            mask = object_mask(gm, s.td, s.td)
            rows[f"{rung}_noise{noise:g}_on_grey"] = share(on_grey(image, mask))
            if noise == 0.0:
                pictures[f"{rung}_noise0"] = image
    return rows, pictures


def figure(gm: GenerativeModel, pictures: dict, n: int, per: int, out: Path, *,
           title: str = "From objects to samples (image level; columns: three test objects "
                        "per category)") -> None:  # fmt: skip
    cols = [c * n + i for c in range(len(gm.categories)) for i in range(min(per, n))]
    size = (0.9 * len(cols), 1.0 * len(pictures))
    fig, axes = plt.subplots(len(pictures), len(cols), figsize=size, squeeze=False)
    for r, (name, x) in enumerate(pictures.items()):
        for j, i in enumerate(cols):
            ax = axes[r, j]
            ax.imshow(x[i].clamp(0, 1).permute(1, 2, 0).numpy())
            ax.set_xticks([]), ax.set_yticks([])
        axes[r, 0].set_ylabel(name.replace("_", " "), fontsize=6, rotation=0, ha="right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--n", type=int, default=100, help="objects (and samples) per category")
    parser.add_argument(
        "--delta-priors", type=int, default=0,
        help="learn the prior on δ of every level, the top's included, from the offsets the "
             "pass picks on this many lone train objects per category (clutter_levers' "
             "dpriortop lever; 0: the model's own, uniform)",
    )  # fmt: skip
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "sample_diagnosis.json")
    args = parser.parse_args()
    if args.n < 1 or args.delta_priors < 0:
        raise SystemExit(f"--n must be >= 1 and --delta-priors >= 0, got {args.n}, "
                         f"{args.delta_priors}")  # fmt: skip
    torch.set_num_threads(1)
    gm, model_name = learned_model(smoke=args.smoke, path=args.model)
    n_priors = (2 if args.smoke else args.delta_priors) if args.delta_priors else 0
    peaks = {}
    if n_priors:
        priors = use_offset_priors(gm, n_priors, top=True)
        peaks = {site: round(float(p.probs.max()), 4) for site, p in priors.items()}
    start = time.perf_counter()
    rows, pictures = ladder(gm, 2 if args.smoke else args.n)
    figure(gm, pictures, 2 if args.smoke else args.n, 3, args.out.with_suffix(".png"))
    result = {
        "machine": machine(),
        "threads": 1,
        "model": model_name,
        "delta_priors_from_objects_per_category": n_priors,
        "delta_prior_peaks": peaks,
        "classifier": "the model's backbone",
        "per_category": 2 if args.smoke else args.n,
        "categories": list(gm.categories),
        "mean": {k: statistics.mean(v) for k, v in rows.items()},
        "per_category_share": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    atomic_write_json(args.out, result)
    for k, v in result["mean"].items():
        print(f"{k:40s} {v:.3f}  {[round(x, 2) for x in rows[k]]}")


if __name__ == "__main__":
    main()
