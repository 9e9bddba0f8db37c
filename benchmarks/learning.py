"""How well a fitted generative model explains single objects (issue #9's quality report).

On held-out objects of the **test** split (seeds no training or tuning used), for the shipped
model (``GenerativeModel.default()``) or ``--model PATH``:

* mask IoU of the backward pass on each object's own activations, category given, at the
  default render scale and at the scene scale (objects as large as in a cluttered scene);
* category accuracy of the backward pass with the category unknown, without and with the
  classifier's probabilities observed as ``bu["category"]``;
* component usage per level (how many objects take each γ), and the distinct top-level (γ, δ)
  among 100 samples per category;
* the fraction of samples (image level, clamped to [0, 1]) that the plain default backbone
  classifies as their category, per category and per ``noise`` (0: the mean path, 1: the model);
* a figure of samples per category (paper Fig. 3) and of reconstructions beside the inputs;
* an ArviZ posterior-predictive check of the observation model on test-split scenes.

One thread. Writes ``benchmarks/results/learning.json`` and ``learning_*.png``; ``--smoke``
trains a tiny model in seconds instead (used by the tests; its check reads 4 scenes, 10 draws
each, against 30 and 50); ``--table`` prints the README table.

Usage: ``python benchmarks/learning.py [--model PATH] [--smoke] [--table]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, learned_model, machine, rendered_objects  # noqa: E402

from pyro_backpass import GenerativeModel, Scenes, greedy_map, sample  # noqa: E402
from pyro_backpass.data import SCENE_SCALE, split_seed  # noqa: E402
from pyro_backpass.files import atomic_write, atomic_write_json  # noqa: E402
from pyro_backpass.learning import (  # noqa: E402
    mask_iou,
    object_passes,
    observation_ppc,
)
from pyro_backpass.levels import full_resolution_level  # noqa: E402


@torch.no_grad()
def evaluate(
    gm: GenerativeModel, *, n: int, n_samples: int, ppc: tuple[int, int] = (30, 50)
) -> dict:
    bb = gm.backbone
    out: dict = {}
    level = full_resolution_level(gm.levels)  # the threshold rule's level
    thr = float(gm.observations[level].mask_threshold)
    for name, scale in (("default_scale", None), ("scene_scale", SCENE_SCALE)):
        images, masks, labels = rendered_objects(gm, n, "test", scale=scale)
        passes = object_passes(gm, bb, images, labels)
        iou = mask_iou(passes["mask"], masks)  # the model's mask: its readout, else the rule
        rule = mask_iou(passes["td"].amax(dim=-3) >= thr, masks)
        out[f"mask_iou_{name}_threshold_rule"] = float(rule.mean())
        out[f"mask_iou_{name}"] = float(iou.mean())
        out[f"mask_iou_{name}_per_category"] = {
            c: float(iou[labels == i].mean()) for i, c in enumerate(gm.categories)
        }
        if scale is None:
            unknown = object_passes(gm, bb, images, None)
            out["category_accuracy"] = float((unknown["category"] == labels).float().mean())
            probs = torch.softmax(bb.logits(bb(images)), dim=-1)
            acts = bb(images)
            bu = {k: v for k, v in acts.items() if k in gm.hidden_levels} | {"category": probs}
            r = greedy_map(gm, bu)
            out["category_accuracy_with_bu_category"] = float(
                (r.assignment["category"] == labels).float().mean()
            )
            out["backbone_accuracy"] = float((probs.argmax(-1) == labels).float().mean())
            figure_reconstructions(images[:: max(1, n)], passes["td"][:: max(1, n)],
                                   passes["mask"][:: max(1, n)])  # fmt: skip
    usage = {}
    images, masks, labels = rendered_objects(gm, n, "test")
    bu = {k: v for k, v in bb(images).items() if k in gm.hidden_levels}
    r = greedy_map(gm, bu, category=labels)
    for name in gm.hidden_levels:
        k = gm.num_components[name]
        usage[name] = torch.bincount(r.assignment[f"gamma_{name}"], minlength=k).tolist()
    out["component_usage"] = usage
    top = gm.hidden_levels[-1]
    distinct, classified = {}, {}
    for noise in (0.0, 1.0):
        classified[str(noise)] = {}
        for i, cat in enumerate(gm.categories):
            s = sample(gm, n_samples, category=i, seed=i, noise=noise)
            if noise == 1.0:
                pairs = set(zip(s.assignment[f"gamma_{top}"].tolist(),
                                s.assignment[f"delta_{top}"].tolist(), strict=True))  # fmt: skip
                distinct[cat] = len(pairs)
            pred = bb.predict(s.td["image"].clamp(0, 1))
            classified[str(noise)][cat] = float((pred == i).float().mean())
    out["distinct_top_gamma_delta_in_samples"] = distinct
    out["samples_classified_as_their_category"] = classified
    figure_samples(gm)
    figure_ppc(gm, n_scenes=ppc[0], draws=ppc[1])
    return out


def figure_ppc(gm: GenerativeModel, *, n_scenes: int = 30, draws: int = 50) -> None:
    """ArviZ posterior-predictive check of the observation model on ``n_scenes`` test-split
    scenes, ``draws`` draws each."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # ArviZ's notice of its 1.x on import
        import arviz as az

    scenes = list(Scenes(n_scenes, seed=split_seed("test")))
    idata = observation_ppc(gm, gm.backbone, scenes, draws=draws)
    names = [f"{level}_frac_above" for level in gm.hidden_levels]
    axes = az.plot_ppc(idata, var_names=names, num_pp_samples=draws, textsize=7)
    fig = axes.ravel()[0].figure
    fig.suptitle(
        "observation model: fraction of elements ≥ λ per object, scenes vs draws", fontsize=9
    )
    _save(fig, "learning_ppc.png")


FIGURES = RESULTS  # figures go beside the results file (main() sets it from --out)


def _save(fig, name: str) -> None:
    path = FIGURES / name
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png"))
    plt.close(fig)


def figure_samples(gm: GenerativeModel, per: int = 8) -> None:
    fig, axes = plt.subplots(len(gm.categories), per, figsize=(per * 1.0, len(gm.categories)))
    for i, cat in enumerate(gm.categories):
        s = sample(gm, per, category=i, seed=100 + i, noise=0.0)
        for j in range(per):
            ax = axes[i, j]
            ax.imshow(s.td["image"][j].clamp(0, 1).permute(1, 2, 0).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(cat, fontsize=8)
    fig.suptitle("samples per category (mean path, noise = 0)", fontsize=9)
    _save(fig, "learning_samples.png")


def figure_reconstructions(images, td, mask) -> None:
    n = images.shape[0]
    fig, axes = plt.subplots(3, n, figsize=(n * 1.0, 3.2), squeeze=False)
    peak = td.amax(dim=-3)
    for j in range(n):
        axes[0, j].imshow(images[j].permute(1, 2, 0).numpy())
        axes[1, j].imshow(peak[j].numpy(), cmap="magma")
        axes[2, j].imshow(mask[j].numpy(), cmap="gray")
        for r in range(3):
            axes[r, j].set_xticks([]), axes[r, j].set_yticks([])
    for r, label in enumerate(["input", "F̂ conv1_1 (max)", "mask"]):
        axes[r, 0].set_ylabel(label, fontsize=7)
    _save(fig, "learning_reconstructions.png")


def table(result: dict) -> str:
    r = result["results"]
    rows = [
        ("mask IoU, category given, default scale (target ≥ 0.75)", r["mask_iou_default_scale"]),
        ("mask IoU, category given, scene scale", r["mask_iou_scene_scale"]),
        ("… the threshold rule on the same passes, default scale",
         r.get("mask_iou_default_scale_threshold_rule", float("nan"))),
        ("… the threshold rule, scene scale",
         r.get("mask_iou_scene_scale_threshold_rule", float("nan"))),
        ("category accuracy, category unknown", r["category_accuracy"]),
        ("… with the classifier's probabilities as bu['category']",
         r["category_accuracy_with_bu_category"]),
        ("backbone's own accuracy on these objects", r["backbone_accuracy"]),
    ]  # fmt: skip
    lines = ["| measure | value |", "|---|---|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in rows]
    for noise, per in r["samples_classified_as_their_category"].items():
        mean = sum(per.values()) / len(per)
        lines.append(f"| samples classified as their category, noise = {noise} | {mean:.3f} |")
    distinct = r["distinct_top_gamma_delta_in_samples"]
    lines.append(
        f"| distinct top-level (γ, δ) in {result['n_samples']} samples per category (min) | "
        f"{min(distinct.values())} |"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "learning.json")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return
    torch.set_num_threads(1)
    global FIGURES
    FIGURES = args.out.parent
    start = time.perf_counter()
    gm, model_name = learned_model(smoke=args.smoke, path=args.model)
    n, n_samples = (2, 4) if args.smoke else (40, 100)
    result = {
        "machine": machine(),
        "threads": 1,
        "model": model_name,
        "split": "test",
        "objects_per_category": n,
        "n_samples": n_samples,
        "results": evaluate(gm, n=n, n_samples=n_samples, ppc=(4, 10) if args.smoke else (30, 50)),
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(args.out, result)
    print(table(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
