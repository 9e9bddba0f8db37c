"""The oracle ladder: where does the backward pass fail on cluttered scenes?

For every target object of held-out scenes (test split), the mask IoU of the backward pass, the
category given, in four settings from hardest to easiest:

(a) ``free``: the pass on the scene, every hidden variable free;
(b) ``top_clamped``: the pass on the scene with the top level's (γ, δ) clamped to the object's
    own E-step assignment (from its masked activations alone), so only the lower levels decide;
(c) ``alone_on_scene_background``: the object alone on the scene's clutter — the scene with
    every *other* instance's visible pixels painted with the plain background colour and the
    object's whole (amodal) rendering pasted back (clutter that other instances hid is lost:
    the renderer keeps no clutter-only layer, so this rung is an approximation);
(d) ``alone_plain``: the pass on the object alone on the plain background.

IoU of (a)/(b) is against the object's visible mask, of (c)/(d) against its whole mask. A big gap
(a) → (b) says the top decision fails; (b) → (d) says the lower levels or the observation model
let clutter in.

One thread. Writes ``benchmarks/results/diagnose.json``; ``--smoke`` trains a tiny model.

Usage: ``python benchmarks/diagnose.py [--model PATH] [--scenes N] [--smoke]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, learned_model, machine  # noqa: E402

from pyro_backpass import GenerativeModel, Scenes, greedy_map  # noqa: E402
from pyro_backpass.data import Instance, split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.learning import (  # noqa: E402
    mask_iou,
    own_top_assignment,
)


def alone_on_clutter(scene, inst) -> torch.Tensor:
    """``(3, H, W)``: the scene without its other instances, ``inst`` pasted back whole."""
    image = scene.image.clone()
    plain = torch.as_tensor(scene.background, dtype=image.dtype).view(3, 1, 1)
    for other in scene.instances:
        if other is not inst:
            image = torch.where(other.mask[None], plain, image)
    return torch.where(inst.amodal_mask[None], inst.image_alone, image)


@torch.no_grad()
def object_rungs(
    gm: GenerativeModel, bu: dict[str, torch.Tensor], inst: Instance, *, scene=None
) -> dict:
    """Mask IoU of the pass for one target object of a scene with activations ``bu``, in
    rungs (a), (b) and (d) of the ladder (keys ``free``, ``top_clamped``, ``alone_plain``),
    and (c) (``alone_on_scene_background``) when the ``scene`` is given."""
    bb = gm.backbone
    top = gm.hidden_levels[-1]
    label = torch.tensor([gm.categories.index(inst.category)])
    free = greedy_map(gm, bu, category=label)
    gamma, delta = own_top_assignment(gm, bb, inst)
    clamped = greedy_map(gm, bu, category=label,
                         clamp={f"gamma_{top}": gamma, f"delta_{top}": delta})  # fmt: skip
    alone_acts = bb(inst.image_alone[None])
    alone = greedy_map(gm, {k: v for k, v in alone_acts.items() if k in gm.hidden_levels},
                       category=label)  # fmt: skip
    rungs = {
        "free": float(mask_iou(free.mask, inst.mask[None])[0]),
        "top_clamped": float(mask_iou(clamped.mask, inst.mask[None])[0]),
        # The model's own mask (its readout if it has one), as on the other rungs.
        "alone_plain": float(mask_iou(alone.mask, inst.amodal_mask[None])[0]),
    }
    if scene is not None:
        c_acts = bb(alone_on_clutter(scene, inst)[None])
        c_pass = greedy_map(gm, {k: v for k, v in c_acts.items() if k in gm.hidden_levels},
                            category=label)  # fmt: skip
        rungs["alone_on_scene_background"] = float(mask_iou(c_pass.mask, inst.amodal_mask[None])[0])
    return rungs


@torch.no_grad()
def ladder(gm: GenerativeModel, n_scenes: int) -> dict:
    rows: dict[str, list[float]] = {
        "free": [], "top_clamped": [], "alone_on_scene_background": [], "alone_plain": []
    }  # fmt: skip
    for scene in Scenes(n_scenes, seed=split_seed("test")):
        acts = gm.backbone(scene.image[None])
        bu = {k: v for k, v in acts.items() if k in gm.hidden_levels}
        for inst in scene.instances:
            if not inst.is_target or inst.category not in gm.categories or not inst.mask.any():
                continue
            for key, value in object_rungs(gm, bu, inst, scene=scene).items():
                rows[key].append(value)
    n = len(rows["free"])
    out = {k: (sum(v) / n if n else float("nan")) for k, v in rows.items()}
    out["objects"] = n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "diagnose.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    gm, model_name = learned_model(smoke=args.smoke, path=args.model)
    n_scenes = 2 if args.smoke else args.scenes
    result = {
        "machine": machine(),
        "threads": 1,
        "model": model_name,
        "split": "test",
        "scenes": n_scenes,
        "mask_iou": ladder(gm, n_scenes),
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(args.out, result)
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result["mask_iou"].items()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
