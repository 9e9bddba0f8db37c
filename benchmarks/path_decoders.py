"""Issue #10's lever 4, first half: top-down decoders trained on their own top-down path.

The shipped recipe fits each level's kernels on the pass's F̂ of the level above (hard EM). Here
a copy of the model is fine-tuned end to end along its **mean path** instead: for lone
train-split objects, every level's (γ, δ) fixed to the backward pass's own assignment (category
given), the path starts from the category's template and each level is φ of the level above
(no bottom-up input); Adam on the sum over levels of the mean squared error against the
object's masked activations (each level's error divided by its targets' mean square, so every
level counts alike). ``--mix w`` adds ``w ×`` the same error with F̂ of the level above as the
input (the shipped recipe's loss), so that the decoders stay fit for the backward pass.

Before and after, measured: both losses on the training objects; the single-object mask IoU
(``--objects`` test objects per category, category given); the sample ladder of
``sample_diagnosis.py`` (its ``own_mean_path`` and ``samples`` rungs: the share classified as
their category by the backbone); and the clutter rungs of ``clutter_levers.py``'s ``base``
lever on ``--scenes`` validation scenes. Writes
``benchmarks/results/clutter_levers/path_decoders.json``. One thread.

Usage: ``python benchmarks/path_decoders.py [--mix 0 1] [--epochs 20] [--smoke]``
"""

from __future__ import annotations

import argparse
import copy
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
from pyro_backpass.learning import mask_iou, masked_activations, object_passes  # noqa: E402
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


def losses(gm: GenerativeModel, data: dict, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(path loss, F̂-input loss) of the objects ``idx``, differentiable in the kernels."""
    targets, a, fhat = data["targets"], data["assignment"], data["fhat"]
    mine = {site: v[idx] for site, v in a.items()}
    path_of = mean_path_levels(gm, data["labels"][idx], mine)
    path = fed = torch.zeros((), dtype=gm.dtype)
    above = None
    for name in reversed(gm.hidden_levels):
        step, target = gm.steps[name], targets[name][idx]
        norm = targets[name].square().mean().clamp_min(1e-12)
        path = path + (path_of[name] - target).square().mean() / norm
        if above is not None:
            gamma, delta = mine[f"gamma_{name}"], mine[f"delta_{name}"]
            given = shift_select(step.phi_per_sample(fhat[above][idx], gamma), step.offsets, delta)
            fed = fed + (given - target).square().mean() / norm
        above = name
    return path, fed


def fine_tune(gm: GenerativeModel, data: dict, *, mix: float, epochs: int, lr: float = 1e-3,
              batch: int = 50, seed: int = 0) -> GenerativeModel:  # fmt: skip
    """A copy of ``gm`` whose kernels (every level's weight and bias) are fine-tuned."""
    out = copy.deepcopy(gm)
    params = [p for name in out.hidden_levels
              for p in (out.steps[name].weight, getattr(out.steps[name], "bias", None))
              if p is not None]  # fmt: skip
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = data["labels"].numel()
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        for epoch in range(epochs):
            order, total = torch.randperm(n, generator=gen), 0.0
            for start in range(0, n, batch):
                path, fed = losses(out, data, order[start : start + batch])
                loss = path + mix * fed
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
            print(f"mix {mix}: epoch {epoch} loss {total:.2f}", flush=True)
        for p in params:
            p.requires_grad_(False)
    return out


@torch.no_grad()
def measure(gm: GenerativeModel, data: dict, *, objects: int, scenes: list) -> dict:
    path, fed = losses(gm, data, torch.arange(data["labels"].numel()))
    images, masks, labels = rendered_objects(gm, objects, "test")
    passes = object_passes(gm, gm.backbone, images, labels)
    rows, _ = ladder(gm, objects)
    keep = ("own_mean_path", "samples_noise0", "samples_noise1")
    return {
        "path_loss": float(path),
        "fhat_input_loss": float(fed),
        "single_object_mask_iou": float(mask_iou(passes["mask"], masks).mean()),
        "classified": {k: statistics.mean(rows[k]) for k in keep},
        "clutter": evaluate(gm, "base", scenes, bound=False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--mix", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--train", type=int, default=100, help="train objects per category")
    parser.add_argument("--objects", type=int, default=40, help="test objects per category")
    parser.add_argument("--scenes", type=int, default=100, help="validation scenes")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path,
                        default=RESULTS / "clutter_levers" / "path_decoders.json")  # fmt: skip
    args = parser.parse_args()
    if min(args.epochs, args.train, args.objects, args.scenes) < 1:
        raise SystemExit("--epochs, --train, --objects and --scenes must be >= 1")
    if any(m < 0 for m in args.mix):
        raise SystemExit(f"--mix weights must be >= 0, got {args.mix}")
    torch.set_num_threads(1)
    gm, model_name = learned_model(smoke=args.smoke, path=args.model)
    if args.smoke:
        args.epochs, args.train, args.objects, args.scenes = 1, 2, 2, 1
    start = time.perf_counter()
    data = training_data(gm, args.train)
    scenes = list(Scenes(args.scenes, seed=split_seed("validation")))
    rows = {"shipped": measure(gm, data, objects=args.objects, scenes=scenes)}
    for mix in args.mix:
        tuned = fine_tune(gm, data, mix=mix, epochs=args.epochs)
        rows[f"path_mix{mix:g}"] = measure(tuned, data, objects=args.objects, scenes=scenes)
        print(f"mix {mix:g}", rows[f"path_mix{mix:g}"], flush=True)
    atomic_write_json(args.out, {
        "machine": machine(), "threads": 1, "model": model_name, "epochs": args.epochs,
        "train_objects_per_category": args.train, "test_objects_per_category": args.objects,
        "validation_scenes": args.scenes, "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
    })  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
