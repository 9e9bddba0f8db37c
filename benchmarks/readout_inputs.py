"""What the mask readout should read (issue #10, rung (b) and single objects): F̂ alone (the
shipped readout), F̂ with the top-down prediction φ, F̂ with the input's own activations (the
library's ``MaskReadout(reads_input=True)``), and — the control that says how much of a mask
the generative model makes — the input's activations alone, with no backward pass at all.

Every variant is the shipped recipe's net (16 hidden channels, 5 × 5, Adam 30 epochs, seed 0)
fitted on the same examples: 200 training objects per category (the pass on each object alone,
category given) and the visible objects of 150 training scenes (the pass on the scene, top
level clamped to the object's own E-step assignment: the oracle ladder's rung (b)); the
logit threshold maximises the mean of the IoU on 20 validation objects per category and on the
objects of 30 validation scenes read the same way. The passes are computed once and shared.

Sources, per level: ``F̂`` (the pass's reconstruction), ``φ`` (the top-down prediction of the
level from F̂ of the level above and the pass's (γ, δ)), ``bu`` (the image's or scene's own
activations). Writes ``benchmarks/results/readout_inputs.json``. One thread.

Usage: ``python benchmarks/readout_inputs.py [--variants KEY…] [--smoke]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, learned_model, machine  # noqa: E402

from pyro_backpass import Scenes, greedy_map  # noqa: E402
from pyro_backpass.data import OBJECT_SCALE, split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.learning import (  # noqa: E402
    LOGIT_GRID,
    fit_readout_net,
    mask_iou,
    own_top_assignment,
    render_object_set,
    standardise_readout,
)
from pyro_backpass.model import MaskReadout, shift_select  # noqa: E402

F3 = ["conv1_1", "pool1", "conv2_1"]  # the shipped readout's levels
P3 = [f"phi_{n}" for n in F3]
P5 = P3 + ["phi_pool2", "phi_conv3_1"]
B3 = [f"bu_{n}" for n in F3]
#: key → the maps read (F̂ by level name; ``phi_``/``bu_`` prefixed for φ and the input)
VARIANTS = {
    "fhat": F3,
    "fhat_phi3": F3 + P3,
    "fhat_phi5": F3 + P5,
    "fhat_bu": F3 + B3,
    "fhat_phi5_bu": F3 + P5 + B3,
    "bu_only": B3,
}
LEVELS = ["conv1_1", "pool1", "conv2_1", "pool2", "conv3_1"]


def _level(key: str) -> str:
    """The level a map of :data:`VARIANTS` belongs to."""
    return key.split("_", 1)[1] if key.startswith(("phi_", "bu_")) else key


def _maps(gm, result, bu) -> dict[str, torch.Tensor]:
    """F̂, φ and bu of :data:`LEVELS` for one pass (batch of the pass)."""
    out, hidden = {}, gm.hidden_levels
    for i, name in enumerate(hidden):
        if name not in LEVELS:
            continue
        step = gm.steps[name]
        upper = result.assignment["category"] if i == len(hidden) - 1 else result.td[hidden[i + 1]]
        phi = step.phi_per_sample(upper, result.assignment[f"gamma_{name}"])
        out[f"phi_{name}"] = shift_select(phi, step.offsets, result.assignment[f"delta_{name}"])
        out[name] = result.td[name]
        out[f"bu_{name}"] = bu[name].expand_as(result.td[name])
    return out


def _cat(parts: list[dict]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


@torch.no_grad()
def object_maps(gm, split: str, n: int):
    images, masks, labels = render_object_set(
        tuple(gm.categories), n, seed=split_seed(split), backbone=gm.backbone,
        scales=(OBJECT_SCALE,),
    )  # fmt: skip
    parts = []
    for start in range(0, images.shape[0], 64):
        sl = slice(start, start + 64)
        bu = {k: v for k, v in gm.backbone(images[sl]).items() if k in gm.hidden_levels}
        parts.append(_maps(gm, greedy_map(gm, bu, category=labels[sl]), bu))
    return _cat(parts), masks


@torch.no_grad()
def scene_object_maps(gm, split: str, n: int):
    """The rung (b) passes of ``top_clamped_passes``, with the scene's activations kept."""
    top, parts, masks = gm.hidden_levels[-1], [], []
    for scene in Scenes(n, seed=split_seed(split)):
        bu = {k: v for k, v in gm.backbone(scene.image[None]).items() if k in gm.hidden_levels}
        for inst in scene.instances:
            if inst.category not in gm.categories or not bool(inst.mask.any()):
                continue
            label = torch.tensor([gm.categories.index(inst.category)])
            gamma, delta = own_top_assignment(gm, gm.backbone, inst)
            r = greedy_map(gm, bu, category=label,
                           clamp={f"gamma_{top}": gamma, f"delta_{top}": delta})  # fmt: skip
            parts.append(_maps(gm, r, bu))
            masks.append(inst.mask[None])
    return _cat(parts), torch.cat(masks)


def fit_variant(gm, names, train, train_masks, val, val_masks, val_s, val_s_masks, *, epochs):
    """The shipped recipe's net on the maps ``names``; IoUs at the threshold chosen on both
    validation sets."""
    specs = {s.name: s for s in gm.levels}
    read = [dataclasses.replace(specs[_level(n)], name=n) for n in names]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        readout = MaskReadout(read, size=tuple(val_masks.shape[1:]), kernel_size=5, hidden=16)
    pick = {n: train[n] for n in names}
    standardise_readout(readout, pick, batch_size=64)
    with torch.enable_grad():
        fit_readout_net(
            readout, lambda rows: readout.features({n: v[rows] for n, v in pick.items()}),
            train_masks, epochs=epochs, batch_size=16, lr=3e-3, seed=0, progress=False,
        )  # fmt: skip
    readout.requires_grad_(False)
    with torch.no_grad():

        def ious(maps, masks):
            logits = torch.cat([readout.logits({n: maps[n][rows] for n in names})
                                for rows in torch.arange(masks.shape[0]).split(64)])  # fmt: skip
            return {t: float(mask_iou(logits > t, masks).mean()) for t in LOGIT_GRID}

        objects, scene_objects = ious(val, val_masks), ious(val_s, val_s_masks)
    best = max(LOGIT_GRID, key=lambda t: ((objects[t] + scene_objects[t]) / 2, -abs(t)))
    return {"objects": objects[best], "scene_objects_top_clamped": scene_objects[best],
            "threshold": best}  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny model and few objects")
    p.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=list(VARIANTS))
    p.add_argument("--out", type=Path, default=RESULTS / "readout_inputs.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    gm, name = learned_model(smoke=args.smoke, path=args.model)
    small = args.smoke
    tr, trm = object_maps(gm, "train", 3 if small else 200)
    trs, trsm = scene_object_maps(gm, "train", 1 if small else 150)
    val, valm = object_maps(gm, "validation", 2 if small else 20)
    vals, valsm = scene_object_maps(gm, "validation", 1 if small else 30)
    train = {k: torch.cat([tr[k], trs[k]]) for k in tr}
    train_masks = torch.cat([trm, trsm])
    result = {"machine": machine(), "threads": 1, "model": name,
              "train": {"objects": int(trm.shape[0]), "scene_objects": int(trsm.shape[0])},
              "validation": {"objects": int(valm.shape[0]), "scene_objects": int(valsm.shape[0])},
              "passes_seconds": round(time.perf_counter() - start, 1), "variants": {}}  # fmt: skip
    for key in args.variants:
        t = time.perf_counter()
        names = VARIANTS[key]
        present = [n for n in names if _level(n) in gm.hidden_levels]  # the smoke model's
        got = fit_variant(gm, present, train, train_masks, val, valm, vals, valsm,
                          epochs=2 if small else 30)  # fmt: skip
        result["variants"][key] = got | {"reads": names,
                                         "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
        print(key, json.dumps(result["variants"][key]), flush=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
