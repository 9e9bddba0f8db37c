"""Issue #10's lever 4: top-down decoders fine-tuned on their own top-down path, or on the path
they take in cluttered scenes.

The shipped recipe fits each level's kernels on the pass's F̂ of the level above (hard EM). Here
a copy of the model is fine-tuned end to end along its **mean path** instead: for lone
train-split objects, every level's (γ, δ) fixed to the backward pass's own assignment (category
given), the path starts from the category's template and each level is φ of the level above
(no bottom-up input); Adam on the sum over levels of the mean squared error against the
object's masked activations (each level's error divided by its targets' mean square, so every
level counts alike). ``--mix w`` adds ``w ×`` the same error with F̂ of the level above as the
input (the shipped recipe's loss), so that the decoders stay fit for the backward pass.

``--scene-weights w …`` (rows ``scene_w<w>``): the recipe's F̂-input loss on the lone objects
plus ``w ×`` the same loss on the objects of ``--scene-train`` train scenes, whose input is F̂ of
the level above **in the scene** (the pass with every (γ, δ) clamped to the assignment of the
pass on the object alone: the oracle's choices, the scene's clutter in the state passed down)
and whose target is the object's masked activations alone — decoders taught to predict the
object from a cluttered state. ``w = 0`` is the control: the recipe's loss alone, trained on.

``--refit`` measures each fine-tuned row again after :func:`refit` (and adds ``shipped_refit``,
the refit alone on the unchanged kernels: the control): ``train_model``'s last stage (mask
threshold, σ0 calibration, mask readout) fitted again for the new kernels, with the
default preset's sizes (so only for models trained with that preset, whose calibration chose
σ0 × 0.5). The calibration's 20 validation scenes are among the ``--scenes`` that score the
rows, as they are for the shipped model.

Before and after, measured: both losses on the training objects (``scene_fhat_input_loss``: on
the training scene objects, in-sample); the single-object mask IoU
(``--objects`` test objects per category, category given); the sample ladder of
``sample_diagnosis.py`` (its ``own_mean_path`` and ``samples`` rungs: the share classified as
their category by the backbone); and the clutter rungs of ``clutter_levers.py``'s ``base``
lever on ``--scenes`` validation scenes. Writes
``benchmarks/results/clutter_levers/path_decoders.json``. One thread.

Usage: ``python benchmarks/path_decoders.py [--mix 0 1] [--scene-weights 0 1 4] [--refit]
[--epochs 20] [--smoke]`` (a bare ``--mix`` runs the scene rows alone)
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from clutter_levers import evaluate  # noqa: E402
from common import RESULTS, learned_model, machine, rendered_objects  # noqa: E402
from sample_diagnosis import ladder, mean_path_levels  # noqa: E402

from pyro_backpass import GenerativeModel, Scenes, greedy_map  # noqa: E402
from pyro_backpass.data import split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.learning import (  # noqa: E402
    PRESETS,
    TrainConfig,
    calibrate_scale_td,
    mask_iou,
    masked_activations,
    object_passes,
    render_object_set,
    train_mask_readout,
    tune_mask_threshold,
)
from pyro_backpass.model import shift_select  # noqa: E402


@torch.no_grad()
def training_data(gm: GenerativeModel, n: int) -> dict:
    """``n`` train-split objects per category: labels, masked activations (the targets), the
    pass's assignment and F̂ per level."""
    images, masks, labels = rendered_objects(gm, n, "train")
    targets = masked_activations(gm.backbone, images, masks)
    acts = gm.backbone(images)
    passes = greedy_map(gm, {k: v for k, v in acts.items() if k in gm.hidden_levels},
                        category=labels)  # fmt: skip
    return {"labels": labels, "targets": targets, "assignment": passes.assignment,
            "fhat": passes.td}  # fmt: skip


def losses(gm: GenerativeModel, data: dict, idx: torch.Tensor, *,
           path: bool = True) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(path loss, F̂-input loss) of the objects ``idx``, differentiable in the kernels;
    ``path=False`` skips the mean path (its loss is then 0)."""
    targets, a, fhat = data["targets"], data["assignment"], data["fhat"]
    mine = {site: v[idx] for site, v in a.items()}
    path_of = mean_path_levels(gm, data["labels"][idx], mine) if path else None
    path = fed = torch.zeros((), dtype=gm.dtype)
    above = None
    for name in reversed(gm.hidden_levels):
        step, target = gm.steps[name], targets[name][idx]
        norm = targets[name].square().mean().clamp_min(1e-12)
        if path_of is not None:
            path = path + (path_of[name] - target).square().mean() / norm
        if above is not None:
            gamma, delta = mine[f"gamma_{name}"], mine[f"delta_{name}"]
            given = shift_select(step.phi_per_sample(fhat[above][idx], gamma), step.offsets, delta)
            fed = fed + (given - target).square().mean() / norm
        above = name
    return path, fed


@torch.no_grad()
def scene_training_data(gm: GenerativeModel, n_scenes: int, *, chunk: int = 32) -> dict:
    """The objects of ``n_scenes`` train-split scenes (every instance of a modelled category
    with visible pixels), in :func:`training_data`'s keys: labels, the object's masked
    activations **alone** (the targets: what the decoders should predict), the assignment of the
    pass on the object alone (category given), and F̂ per level of the pass **in its scene** with
    every (γ, δ) clamped to that assignment (the input a decoder gets there: the upper level's
    state with the scene's clutter in it)."""
    bb, levels = gm.backbone, gm.hidden_levels
    items = [(scene, inst) for scene in Scenes(n_scenes, seed=split_seed("train"))
             for inst in scene.instances
             if inst.category in gm.categories and inst.mask.any()]  # fmt: skip
    parts: dict[str, list] = {"labels": [], "targets": [], "assignment": [], "fhat": []}
    for start in range(0, len(items), chunk):
        batch = items[start : start + chunk]
        labels = torch.tensor([gm.categories.index(inst.category) for _, inst in batch])
        alone = torch.stack([inst.image_alone for _, inst in batch])
        amodal = torch.stack([inst.amodal_mask for _, inst in batch])
        alone_acts = bb(alone)
        own = greedy_map(gm, {k: v for k, v in alone_acts.items() if k in levels},
                         category=labels).assignment  # fmt: skip
        scene_acts = bb(torch.stack([scene.image for scene, _ in batch]))
        clamp = {site: v for site, v in own.items() if site != "category"}
        in_scene = greedy_map(gm, {k: v for k, v in scene_acts.items() if k in levels},
                              category=labels, clamp=clamp)  # fmt: skip
        parts["labels"].append(labels)
        parts["targets"].append(masked_activations(bb, alone, amodal, acts=alone_acts))
        parts["assignment"].append(own)
        parts["fhat"].append(in_scene.td)
    cat = lambda dicts: {k: torch.cat([d[k] for d in dicts]) for k in dicts[0]}  # noqa: E731
    return {"labels": torch.cat(parts["labels"]), "targets": cat(parts["targets"]),
            "assignment": cat(parts["assignment"]), "fhat": cat(parts["fhat"])}  # fmt: skip


def fine_tune(gm: GenerativeModel, data: dict, *, mix: float, epochs: int,
              path_weight: float = 1.0, scene: dict | None = None, scene_weight: float = 0.0,
              lr: float = 1e-3, batch: int = 50, seed: int = 0) -> GenerativeModel:  # fmt: skip
    """A copy of ``gm`` whose kernels (every level's weight and bias) are fine-tuned on
    ``path_weight × path + mix × F̂-input`` loss of the lone objects ``data``, plus
    ``scene_weight ×`` the F̂-input loss of the scene objects ``scene`` (one of their batches
    beside each lone batch, cycling)."""
    out = copy.deepcopy(gm)
    params = [p for name in out.hidden_levels
              for p in (out.steps[name].weight, getattr(out.steps[name], "bias", None))
              if p is not None]  # fmt: skip
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = data["labels"].numel()
    m = 0 if scene is None else scene["labels"].numel()
    scene_order = torch.randperm(m, generator=gen) if m else None
    step = 0
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        for epoch in range(epochs):
            order, total = torch.randperm(n, generator=gen), 0.0
            for start in range(0, n, batch):
                path, fed = losses(out, data, order[start : start + batch], path=path_weight > 0)
                loss = path_weight * path + mix * fed
                if m and scene_weight > 0:
                    idx = scene_order[torch.arange(step * batch, (step + 1) * batch) % m]
                    loss = loss + scene_weight * losses(out, scene, idx, path=False)[1]
                    step += 1
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
            print(f"fine-tune: epoch {epoch} loss {total:.2f}", flush=True)
        for p in params:
            p.requires_grad_(False)
    return out


def refit(gm: GenerativeModel, *, config: TrainConfig,
          multipliers: tuple[float, ...] = (2.0, 1.0, 0.5, 0.2)) -> dict:  # fmt: skip
    """``train_model``'s last stage again for ``gm``'s new kernels (in place), with ``config``'s
    sizes: the mask readout detached, the threshold rule's mask threshold tuned on the
    validation objects, σ0 of the upper levels recalibrated on the validation scenes (scored
    with that rule, as in training), the threshold tuned again, then the mask readout refitted.
    The σ0 multipliers are relative to the current σ0; the default, (2, 1, 0.5, 0.2), is the
    recipe's (1, 0.5, 0.25, 0.1) of the uncalibrated σ0 for a model whose calibration chose 0.5
    (the shipped model), ties to the first. Returns the calibration's scores."""
    bb = gm.backbone
    gm.attach_mask_readout(None)
    seed = split_seed("validation", config.seed)
    validation = render_object_set(config.categories, config.validation_per_category,
                                   seed=seed, backbone=bb)  # fmt: skip
    tune_mask_threshold(gm, bb, validation, multipliers=config.mask_multipliers)
    val = list(Scenes(config.calibration_scenes, seed=seed))
    scores = calibrate_scale_td(gm, bb, val, levels=config.calibration_levels,
                                multipliers=multipliers, progress=False)  # fmt: skip
    tune_mask_threshold(gm, bb, validation, multipliers=config.mask_multipliers)
    train_mask_readout(gm, bb, config, validation=validation)
    return {str(k): v for k, v in scores.items()}


@torch.no_grad()
def measure(gm: GenerativeModel, data: dict, *, objects: int, scenes: list,
            scene: dict | None = None) -> dict:  # fmt: skip
    path, fed = losses(gm, data, torch.arange(data["labels"].numel()))
    images, masks, labels = rendered_objects(gm, objects, "test")
    passes = object_passes(gm, gm.backbone, images, labels)
    rows, _ = ladder(gm, objects)
    keep = ("own_mean_path", "samples_noise0", "samples_noise1")
    out = {
        "path_loss": float(path),
        "fhat_input_loss": float(fed),
        "single_object_mask_iou": float(mask_iou(passes["mask"], masks).mean()),
        "classified": {k: statistics.mean(rows[k]) for k in keep},
        "clutter": evaluate(gm, "base", scenes, bound=False),
    }
    if scene is not None:
        out["scene_fhat_input_loss"] = float(
            losses(gm, scene, torch.arange(scene["labels"].numel()), path=False)[1]
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument(
        "--mix", type=float, nargs="*", default=[0.0, 1.0],
        help="path rows: path loss + mix × F̂-input loss (lone objects)",
    )  # fmt: skip
    parser.add_argument("--scene-weights", type=float, nargs="*", default=[],
                        help="scene rows: F̂-input loss of lone objects + w × that of scene "
                             "objects (w = 0: the recipe's loss alone, the control)")  # fmt: skip
    parser.add_argument("--scene-train", type=int, default=100,
                        help="train scenes whose objects the scene rows learn from")  # fmt: skip
    parser.add_argument(
        "--refit", action="store_true",
        help="measure each fine-tuned row again after refitting σ0's calibration and the "
             "mask readout (train_model's last stage)",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--train", type=int, default=100, help="train objects per category")
    parser.add_argument("--objects", type=int, default=40, help="test objects per category")
    parser.add_argument("--scenes", type=int, default=100, help="validation scenes")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path,
                        default=RESULTS / "clutter_levers" / "path_decoders.json")  # fmt: skip
    args = parser.parse_args()
    if min(args.epochs, args.train, args.objects, args.scenes, args.scene_train) < 1:
        raise SystemExit("--epochs, --train, --objects, --scenes and --scene-train must be >= 1")
    for option, weights in (("--mix", args.mix), ("--scene-weights", args.scene_weights)):
        if not all(math.isfinite(w) and w >= 0 for w in weights):
            raise SystemExit(f"{option} weights must be finite and >= 0, got {weights}")
        if len(set(weights)) < len(weights):
            raise SystemExit(f"{option} lists a weight twice: {weights}")
    if not args.mix and not args.scene_weights:
        raise SystemExit("nothing to fine-tune: give --mix or --scene-weights")
    torch.set_num_threads(1)
    gm, model_name = learned_model(smoke=args.smoke, path=args.model)
    config = PRESETS["smoke" if args.smoke else "default"]
    if args.smoke:
        args.epochs, args.train, args.objects, args.scenes, args.scene_train = 1, 2, 2, 1, 1
    start = time.perf_counter()
    data = training_data(gm, args.train)
    scene = scene_training_data(gm, args.scene_train) if args.scene_weights else None
    scenes = list(Scenes(args.scenes, seed=split_seed("validation")))
    kw = {"objects": args.objects, "scenes": scenes, "scene": scene}
    rows = {"shipped": measure(gm, data, **kw)}
    calibration = {}
    if args.refit:  # the control: the refit alone, on the shipped kernels
        same = copy.deepcopy(gm)
        calibration["shipped"] = refit(same, config=config)
        rows["shipped_refit"] = measure(same, data, **kw)
        print("shipped_refit", rows["shipped_refit"], flush=True)
    runs = [(f"path_mix{m:g}", {"mix": m}) for m in args.mix]
    runs += [(f"scene_w{w:g}", {"mix": 1.0, "path_weight": 0.0, "scene": scene, "scene_weight": w})
             for w in args.scene_weights]  # fmt: skip
    for name, options in runs:
        tuned = fine_tune(gm, data, epochs=args.epochs, **options)
        rows[name] = measure(tuned, data, **kw)
        print(name, rows[name], flush=True)
        if args.refit:
            calibration[name] = refit(tuned, config=config)
            rows[f"{name}_refit"] = measure(tuned, data, **kw)
            print(f"{name}_refit", rows[f"{name}_refit"], flush=True)
    atomic_write_json(args.out, {
        "machine": machine(), "threads": 1, "model": model_name, "epochs": args.epochs,
        "train_objects_per_category": args.train, "test_objects_per_category": args.objects,
        "validation_scenes": args.scenes,
        "scene_objects": 0 if scene is None else int(scene["labels"].numel()),
        "scene_train_scenes": args.scene_train if scene is not None else 0,
        "refit_sigma0_calibration": calibration, "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    })  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
