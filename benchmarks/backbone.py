"""Benchmark the shipped backbones: accuracy, training time, throughput, compositionality.

For each shipped backbone (``Backbone.default()``, ``Backbone.default(compositional=True)`` and
``Backbone.default(localised=True)``):

* held-out accuracy on freshly rendered objects from a seed no training run used, and the
  held-out accuracy and training time its training run recorded in the checkpoint;
* forward-pass throughput (images/s, CPU, median of several timed runs, batch 64 at the
  training size), with the machine described;
* the per-level compositionality number (relative change of each object's activations inside
  its visible mask, scene vs. the object alone; lower is more compositional) on held-out scenes.

Writes ``benchmarks/results/backbone.json`` and ``benchmarks/results/backbone_compositionality.png``
(the supplement's distractor sweep, Fig. 7–8, for both backbones) and prints a markdown table.
``--smoke`` runs on tiny sizes in seconds (a test runs it).

``--checkpoint NAME=PATH`` adds ``train-backbone`` checkpoints (e.g. the ``--localised`` ones
of issue #10's lever 3); every backbone also gets ``off_object_energy``, per level the mean
activation energy of a scene cell off the known objects over that of a cell on one, and
``cam_auc``, per category the ROC AUC of the top level's per-cell logit for the category's cells
against cells without it.

Usage: ``python benchmarks/backbone.py [--smoke] [--out PATH] [--figure PATH]
[--checkpoint NAME=PATH ...]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine  # noqa: E402
from veto_diagnosis import roc_auc  # noqa: E402

from pyro_backpass.backbone import (  # noqa: E402
    HELD_OUT_SEED_OFFSET,
    Backbone,
    background_ratio,
    cell_targets,
    compositionality_score,
    distractor_sweep,
)
from pyro_backpass.data import (  # noqa: E402
    CATEGORIES,
    DEFAULT_SIZE,
    make_scene,
    render_objects,
    render_scene_pairs,
)
from pyro_backpass.files import atomic_write, atomic_write_json  # noqa: E402
from pyro_backpass.viz import plot_distractor_sweep  # noqa: E402

# Seeds no training run uses (training: 0 and 0 + offset for its held-out set).
OBJECT_SEED = 2 * HELD_OUT_SEED_OFFSET
SCENE_SEED = 3 * HELD_OUT_SEED_OFFSET


@torch.no_grad()
def throughput(backbone: Backbone, *, batch: int, size: int, runs: int) -> dict[str, float]:
    """Median images/s of ``backbone(images)`` over ``runs`` timed runs, per thread count.

    Both 1 and 2 threads: on a shared 2-core machine 2 threads can be the slower (each
    OpenMP barrier waits for a core another process holds).
    """
    x = torch.rand(batch, 3, size, size)
    before = torch.get_num_threads()
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        backbone(x)  # warm-up
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            backbone(x)
            times.append(time.perf_counter() - t)
        out[f"{threads}_threads"] = round(batch / statistics.median(times), 1)
    torch.set_num_threads(before)
    return out


def sweep_figure(backbones: dict[str, Backbone], path: Path, *, size: int) -> None:
    """Supplement Fig. 7–8 for each backbone: an airplane, a car moving in from the left."""
    plane = make_scene(targets=("airplane",), distractors=0, clutter=False, size=size, seed=11)
    car = make_scene(targets=("car",), distractors=0, clutter=False, size=size, seed=12)
    p, c = plane.instances[0], car.instances[0]
    sweeps = {
        name: distractor_sweep(bb, p.image_alone, p.amodal_mask, c.image_alone, c.amodal_mask)
        for name, bb in backbones.items()
    }
    first = next(iter(sweeps.values()))
    keys = torch.linspace(0, len(first.shifts) - 1, 4).round().long().tolist()
    fig = plt.figure(figsize=(4 * len(sweeps) + 1, 6.5))
    grid = fig.add_gridspec(2, 4 * len(sweeps), height_ratios=[1, 1.6])
    for j, t in enumerate(keys):
        ax = fig.add_subplot(grid[0, j * len(sweeps) : (j + 1) * len(sweeps)])
        ax.imshow(first.frames[t].permute(1, 2, 0).numpy())
        ax.set_title(f"gap {int(first.gap[t])} px", fontsize=8)
        ax.axis("off")
    ymax = max(float(v[:, None].max()) for s in sweeps.values() for v in s.change.values())
    for i, (name, sweep) in enumerate(sweeps.items()):
        ax = fig.add_subplot(grid[1, 4 * i : 4 * (i + 1)])
        plot_distractor_sweep(sweep, ax=ax)
        ax.set_ylim(0, min(ymax, 2.0) * 1.05)
        ax.set_title(name, fontsize=9)
    fig.suptitle("Change of the airplane's activations inside its mask as a car moves in")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


LOCALISATION_KEYS = ("localisation_weight", "full_cover", "background_levels", "background_weight")


@torch.no_grad()
def off_object_energy(bb: Backbone, pairs) -> dict[str, float]:
    """Per conv/pool level, the mean activation energy of a cell off every known object over
    that of a cell on one, on the held-out scenes (``train-backbone --localised``'s background
    ratio, measured; clutter and plain background count as off). Lower: the level fires less
    off the objects."""
    acts = bb(pairs.scenes)
    levels = [s.name for s in acts.levels if s.kind not in ("image", "category")]
    return {
        name: round(background_ratio(acts, pairs.masks, pairs.scene_index, levels=[name]).item(), 4)
        for name in levels
    }


@torch.no_grad()
def cam_auc(bb: Backbone, pairs) -> dict[str, float]:
    """Per category, ROC AUC of the top level's per-cell logit (``Backbone.cell_logits``) for
    cells the category's visible masks cover ≥ 25 % against cells no instance of it touches, on
    the held-out scenes (partly covered cells left out): does the class activation map point at
    the objects, or at clutter too?"""
    top = bb.levels_for(tuple(pairs.scenes.shape[-2:]))[-2]  # the last pool, below category
    cells = bb.cell_logits(pairs.scenes)  # (S, K, h, w)
    target = cell_targets(pairs.masks, pairs.labels, pairs.scene_index,
                          n_scenes=len(pairs.scenes), num_classes=len(bb.categories),
                          size=(top.height, top.width))  # fmt: skip
    out = {}
    for k, name in enumerate(bb.categories):
        t, score = target[:, k], cells[:, k]
        keep = (t == 0) | (t == 1)
        out[name] = round(roc_auc(score[keep], t[keep] == 1), 4)
    out["mean"] = round(sum(out.values()) / len(bb.categories), 4)
    return out


def markdown_table(rows: dict[str, dict]) -> str:
    levels = list(next(iter(rows.values()))["relative_change"])
    head = (
        "| backbone | held-out acc. | train time (s) | images/s (1 / 2 threads) | "
        + " | ".join(levels)
        + " |"
    )
    lines = [head, "|" + "---|" * (4 + len(levels))]
    for name, r in rows.items():
        cells = [
            name,
            f"{r['held_out_accuracy']:.3f}",
            f"{r['training']['total_seconds']:.0f}" if r["training"] else "–",
            " / ".join(f"{v:.0f}" for v in r["images_per_second"].values()),
        ] + [f"{r['relative_change'][lv]:.3f}" for lv in levels]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The penalty variants compared by `--penalty-selection` (short runs, one seed): which levels,
# which normalisation. Issue 3's throwaway experiment motivates the absolute/relative pair.
VARIANTS: dict[str, dict] = {
    "plain": {"compositional": False},
    "absolute pool1-4": {
        "penalty": "absolute",
        "penalty_levels": ("pool1", "pool2", "pool3", "pool4"),
    },
    "relative pool1-4": {
        "penalty": "relative",
        "penalty_levels": ("pool1", "pool2", "pool3", "pool4"),
    },
    "relative pool3-4": {"penalty": "relative", "penalty_levels": ("pool3", "pool4")},
    "relative pool1-4 w0.3": {
        "penalty": "relative",
        "penalty_levels": ("pool1", "pool2", "pool3", "pool4"),
        "penalty_weight": 0.3,
    },
    "relative pool1-4 w0.1": {
        "penalty": "relative",
        "penalty_levels": ("pool1", "pool2", "pool3", "pool4"),
        "penalty_weight": 0.1,
    },
    "relative all": {
        "penalty": "relative",
        "penalty_levels": (
            "conv1_1",
            "pool1",
            "conv2_1",
            "pool2",
            "conv3_1",
            "pool3",
            "conv4_1",
            "pool4",
        ),
    },
}


def penalty_selection(path: Path, *, smoke: bool, names: Sequence[str] | None = None) -> dict:
    """Train each variant briefly; per level, the compositionality number on held-out scenes.

    ``names`` picks variants; their results are merged into an existing ``path``.
    """
    from dataclasses import replace

    from pyro_backpass.backbone import TrainConfig, train_backbone

    base = TrainConfig(n_train=800, n_test=100, epochs=6, n_scenes=600, compositional=True)
    n_scenes = 200
    if smoke:
        base = replace(base, cfg=(4, "M", 4, "M", 8, "M", 8, "M"), n_train=4, n_test=2, epochs=1)
        base, n_scenes = replace(base, n_scenes=2, batch_size=8, scene_batch=2), 3
    pairs = render_scene_pairs(n_scenes, categories=CATEGORIES, size=DEFAULT_SIZE, seed=SCENE_SEED)
    old = json.loads(path.read_text()) if path.exists() and not smoke else {}
    out: dict[str, dict] = old.get("variants", {})
    for name in names or list(VARIANTS):
        changes = VARIANTS[name]
        result = train_backbone(replace(base, **changes), progress=False)
        score = compositionality_score(
            result.backbone, pairs.scenes, pairs.objects, pairs.masks, pairs.scene_index
        )
        out[name] = {
            "held_out_accuracy": result.held_out_accuracy,
            "train_seconds": round(result.train_seconds, 1),
            "relative_change": score.relative_change,
        }
        print(name, f"acc {result.held_out_accuracy:.3f}", score, flush=True)
    record = {"base_config": {k: str(v) for k, v in vars(base).items()}, "variants": out}
    atomic_write_json(path, record)
    return record


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    parser.add_argument(
        "--penalty-selection",
        type=Path,
        default=None,
        help="instead: compare penalty variants in short runs, write this JSON (minutes)",
    )
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "backbone.json")
    parser.add_argument("--figure", type=Path, default=RESULTS / "backbone_compositionality.png")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="print --out's results as markdown")
    parser.add_argument(
        "--checkpoint",
        nargs="+",
        default=[],
        metavar="NAME=PATH",
        help="also measure these train-backbone checkpoints (e.g. localised=checkpoints/bb)",
    )
    args = parser.parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(args.out.read_text())["backbones"]))
        return None
    torch.set_num_threads(args.threads)
    if args.penalty_selection is not None:
        return penalty_selection(args.penalty_selection, smoke=args.smoke, names=args.variants)
    n_objects, n_scenes, runs = (2, 3, 2) if args.smoke else (200, 300, 9)
    size = DEFAULT_SIZE

    backbones = {"small_vgg": Backbone.default()}
    backbones["small_vgg_compositional"] = Backbone.default(compositional=True)
    backbones["small_vgg_localised"] = Backbone.default(localised=True)
    for item in args.checkpoint:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            parser.error(f"--checkpoint takes NAME=PATH, got {item!r}")
        if name in backbones:
            parser.error(f"--checkpoint: the name {name!r} is taken; choose another")
        backbones[name] = Backbone.load(path)
    images, labels = render_objects(CATEGORIES, n_objects, size=size, seed=OBJECT_SEED)
    pairs = render_scene_pairs(n_scenes, categories=CATEGORIES, size=size, seed=SCENE_SEED)
    rows: dict[str, dict] = {}
    for name, bb in backbones.items():
        bb.eval()
        acc = (bb.predict(images) == labels).float().mean().item()
        score = compositionality_score(
            bb, pairs.scenes, pairs.objects, pairs.masks, pairs.scene_index
        )
        training = bb.info.get("training", {})
        # Scene-scale objects alone: smaller than the single-object renders (the compositional
        # backbone also trains on such objects, the plain one does not).
        small_acc = (bb.predict(pairs.objects) == pairs.labels).float().mean().item()
        rows[name] = {
            "held_out_accuracy": acc,
            "scene_objects_alone_accuracy": small_acc,
            "n_held_out": len(images),
            "images_per_second": throughput(bb, batch=64, size=size, runs=runs),
            "relative_change": score.relative_change,
            "off_object_energy": off_object_energy(bb, pairs),
            "cam_auc": cam_auc(bb, pairs),
            "n_scene_objects": score.n_objects,
            "training": {
                k: training.get(k)
                for k in ("held_out_accuracy", "n_held_out", "render_seconds", "train_seconds")
                + ("total_seconds",)
            }
            if training
            else {},
            "cfg": list(bb.cfg),
            "image_size": list(bb.image_size),
            "penalty": (
                {k: training["config"][k] for k in ("penalty", "penalty_levels", "penalty_weight")}
                if training and training["config"].get("compositional")
                else None
            ),
            "localisation": (
                {k: training["config"][k] for k in LOCALISATION_KEYS}
                if training and training["config"].get("localised")
                else None
            ),
        }
    vgg16 = None
    if not args.smoke:
        # Random weights: throughput does not depend on them.
        vgg16 = throughput(Backbone.vgg16(), batch=4, size=224, runs=3)
    result = {
        "machine": machine(),
        "smoke": args.smoke,
        "image_size": size,
        "object_seed": OBJECT_SEED,
        "scene_seed": SCENE_SEED,
        "n_scenes": n_scenes,
        "backbones": rows,
        "vgg16_224px_images_per_second": vgg16,
    }
    atomic_write_json(args.out, result)
    sweep_figure(backbones, args.figure, size=size)
    print(markdown_table(rows))
    return result


if __name__ == "__main__":
    main()
