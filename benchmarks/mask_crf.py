"""Issue #10, a lever on the pass's mask: a colour-bilateral mean-field CRF
(:func:`~pyro_backpass.refine_mask`) whose unary term is the mask readout's logit — does
snapping the mask to colour edges stop it spilling onto the objects that touch it?

On cluttered scenes of one split (2–3 airplanes, distractors, clutter; category clamped to
airplane), for the pass's own mask (``none``) and for each CRF setting
(``s<spatial>_c<colour>_w<weight>``):

- ``top_clamped``: mean IoU, against each airplane's visible mask, of the pass with the top
  level clamped to the airplane's own E-step assignment (rung (b) of the oracle ladder);
- ``greedy`` / ``verified``: the first pass of :func:`~pyro_backpass.greedy_map` /
  :func:`~pyro_backpass.verified_map` (the shipped verifier): share of scenes with IoU ≥ 0.5 /
  ≥ 0.3 with one of the airplanes, and the pass's mean best IoU;
- ``alone``: mean IoU, against the amodal mask, of each airplane alone on the plain background
  (rung (d));
- ``objects``: mean mask IoU of ``--objects`` lone rendered objects a category of the split,
  category given (the single-object metric of ``learning.py``).

``--colour-model`` adds rows of a GrabCut-style colour model on top of the library's CRF
(Rother et al. 2004): the CRF's probabilities fit colour histograms of the object and of the
background (8 bins a channel, add-one smoothed; the background's pixels all of the frame or
only those within ``local`` pixels of the mask), ``a`` × their log-ratio is added to the unary
term and the CRF is run again, ``rounds`` times (``colour_model_a<a>_r<rounds>_l<local>``).

``--verifier FILE`` runs the verified pass with that verifier instead of the shipped one (e.g.
one fitted on CRF-refined masks, ``fit_verifier.py --refine``). ``--grid`` measures every
setting of the grid (choose on ``--split validation`` by ``top_clamped``); otherwise the one
given by ``--spatial --colour --weight`` (the library's defaults unless given). One thread.
Writes ``benchmarks/results/mask_crf_<split>.json`` and, beside it, a figure of three scenes'
verified masks before and after.

Usage: ``python benchmarks/mask_crf.py --split validation --grid`` then
``python benchmarks/mask_crf.py --split test --scenes 40``
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    RESULTS,
    hidden_bu,
    learned_model,
    machine,
    panel_figure,
    rendered_objects,
)

from pyro_backpass import (  # noqa: E402
    DescentVerifier,
    GenerativeModel,
    Scenes,
    greedy_map,
    verified_map,
)
from pyro_backpass.data import split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.inference import colour_crf, readout_unary  # noqa: E402
from pyro_backpass.learning import mask_iou, own_top_assignment  # noqa: E402

GRID = {"spatial": (4.0, 8.0), "colour": (0.02, 0.05), "weight": (3.0,)}


COLOUR_MODELS = ({"a": 1.0, "rounds": 1, "local": 0}, {"a": 1.0, "rounds": 2, "local": 0},
                 {"a": 1.0, "rounds": 1, "local": 8})  # fmt: skip


def colour_log_ratio(q: torch.Tensor, image: torch.Tensor, *, local: int,
                     bins: int = 8) -> torch.Tensor:  # fmt: skip
    """``(1, H, W)``: log p(colour | object) − log p(colour | background) of each pixel, the
    histograms weighted by the probabilities ``q`` ``(1, H, W)`` and 1 − ``q`` (the background's
    only within ``local`` pixels of ``q > 0.5`` if ``local`` > 0)."""
    idx = (image.clamp(0, 1 - 1e-6) * bins).long()  # (3, H, W)
    code = ((idx[0] * bins + idx[1]) * bins + idx[2]).flatten()  # (H·W,)
    fg, bg = q.flatten(), 1 - q.flatten()
    if local > 0:
        near = torch.nn.functional.max_pool2d((q > 0.5).float()[None], 2 * local + 1, 1, local)
        bg = bg * near.flatten()
    hist_fg = torch.zeros(bins**3).index_add_(0, code, fg) + 1.0
    hist_bg = torch.zeros(bins**3).index_add_(0, code, bg) + 1.0
    ratio = (hist_fg / hist_fg.sum()).log() - (hist_bg / hist_bg.sum()).log()
    return ratio[code].view_as(q)


def colour_model_mask(u: torch.Tensor, image: torch.Tensor, *, a: float, rounds: int,
                      local: int) -> torch.Tensor:  # fmt: skip
    """``(1, H, W)`` bool: the library's CRF, then ``rounds`` of the colour model."""
    q = colour_crf(u, image)
    for _ in range(rounds):
        q = colour_crf(u + a * colour_log_ratio(q, image, local=local), image)
    return q > 0.5


def setting_name(spatial: float, colour: float, weight: float) -> str:
    return f"s{spatial:g}_c{colour:g}_w{weight:g}"


@torch.no_grad()
def collect(gm: GenerativeModel, scenes: list, *, verified: bool, objects: int = 0,
            split: str = "validation",
            verifier: DescentVerifier | None = None) -> dict:  # fmt: skip
    """Every mask the benchmark refines, as (unary ``(1, H, W)``, image ``(3, H, W)``, true
    masks ``(n, H, W)``) per measurement: the readout's logit minus its threshold for each pass."""
    top = gm.hidden_levels[-1]
    airplane = gm.categories.index("airplane")
    out = {"top_clamped": [], "alone": [], "greedy": [], "verified": [], "objects": []}

    def unary(result, bu) -> torch.Tensor:
        return readout_unary(gm, result.td, bu)

    for scene in tqdm(scenes, desc="passes", leave=False):
        planes = [i for i in scene.instances if i.category == "airplane" and i.mask.any()]
        if not planes:
            continue
        bu = hidden_bu(gm, scene.image)
        truth = torch.stack([i.mask for i in planes])
        out["greedy"].append((unary(greedy_map(gm, bu, category=airplane), bu), scene.image, truth))
        if verified:
            found = verified_map(gm, bu, category=airplane, verifier=verifier)
            out["verified"].append((unary(found, bu), scene.image, truth))
        for inst in planes:
            gamma, delta = own_top_assignment(gm, gm.backbone, inst)
            first = greedy_map(gm, bu, category=airplane,
                               clamp={f"gamma_{top}": gamma, f"delta_{top}": delta})  # fmt: skip
            out["top_clamped"].append((unary(first, bu), scene.image, inst.mask[None]))
            lone_bu = hidden_bu(gm, inst.image_alone)
            lone = greedy_map(gm, lone_bu, category=airplane)
            out["alone"].append((unary(lone, lone_bu), inst.image_alone, inst.amodal_mask[None]))
    if objects:
        images, masks, labels = rendered_objects(gm, objects, split)
        for image, mask, label in zip(images, masks, labels, strict=True):
            bu = hidden_bu(gm, image)
            out["objects"].append((unary(greedy_map(gm, bu, category=int(label)), bu), image,
                                   mask[None]))  # fmt: skip
    return out


def score(masks: dict, setting: dict | None) -> dict:
    """The module docstring's row for one CRF ``setting`` (None: the readout's own mask)."""

    def refine(u: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        if setting is None:
            return u > 0
        if "rounds" in setting:
            return colour_model_mask(u, image, **setting)
        return colour_crf(u, image, **setting) > 0.5

    row = {}
    for key in ("top_clamped", "alone", "objects"):
        if not masks[key]:
            continue
        row[key] = statistics.mean(float(mask_iou(refine(u, im), t)[0]) for u, im, t in masks[key])
    for key in ("greedy", "verified"):
        if not masks[key]:
            continue
        ious = [mask_iou(refine(u, im).expand_as(t), t) for u, im, t in masks[key]]
        row[key] = {"hit@0.5": statistics.mean(float(v.max() >= 0.5) for v in ious),
                    "hit@0.3": statistics.mean(float(v.max() >= 0.3) for v in ious),
                    "best_iou": statistics.mean(float(v.mean()) for v in ious)}  # fmt: skip
    return row


def figure(masks: dict, setting: dict, path: Path) -> None:
    """Three scenes' verified (else greedy) masks: the scene, the readout's mask, the CRF's."""
    rows = []
    for u, image, truth in (masks["verified"] or masks["greedy"])[:3]:
        before, after = u[0] > 0, colour_crf(u, image, **setting)[0] > 0.5
        iou = [float(mask_iou(m[None].expand_as(truth), truth).max()) for m in (before, after)]
        rows.append([(image.permute(1, 2, 0).clamp(0, 1), "scene"),
                     (truth.any(0), "airplanes' visible masks"),
                     (before, f"pass's mask (IoU {iou[0]:.2f})"),
                     (after, f"CRF (IoU {iou[1]:.2f})")])  # fmt: skip
    panel_figure(rows, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--grid", action="store_true", help="every setting of GRID")
    parser.add_argument("--objects", type=int, default=0, help="lone objects a category")
    parser.add_argument("--spatial", type=float, default=8.0)
    parser.add_argument("--colour", type=float, default=0.05)
    parser.add_argument("--weight", type=float, default=3.0)
    parser.add_argument("--verifier", type=Path, default=None,
                        help="the verified pass's verifier file (default: the shipped "
                             "one), e.g. one fitted by fit_verifier.py --refine")  # fmt: skip
    parser.add_argument("--colour-model", action="store_true",
                        help="also the rows of COLOUR_MODELS (the module's note)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.scenes < 1 or args.objects < 0:
        raise SystemExit("--scenes must be >= 1 and --objects >= 0")
    torch.set_num_threads(1)
    gm, model_name = learned_model(smoke=args.smoke, path=args.model)
    if getattr(gm, "mask_readout", None) is None:
        raise SystemExit(f"{model_name} has no mask readout: the CRF's unary term is its logit")
    verified = not (args.smoke or args.model is not None)
    scenes = list(Scenes(2 if args.smoke else args.scenes, seed=split_seed(args.split)))
    start = time.perf_counter()
    verifier = None if args.verifier is None else DescentVerifier.load(args.verifier)
    masks = collect(gm, scenes, verified=verified, objects=1 if args.smoke else args.objects,
                    split=args.split, verifier=verifier)  # fmt: skip
    if args.grid:
        settings = [dict(zip(GRID, v, strict=True)) for v in itertools.product(*GRID.values())]
    else:
        settings = [{"spatial": args.spatial, "colour": args.colour, "weight": args.weight}]
    rows = {"none": score(masks, None)}
    for setting in tqdm(settings, desc="CRF settings", leave=False):
        rows[setting_name(**setting)] = {**setting, **score(masks, setting)}
    best = max(settings, key=lambda s: rows[setting_name(**s)]["top_clamped"])
    if args.colour_model:
        for model in tqdm(COLOUR_MODELS, desc="colour models", leave=False):
            name = "colour_model_a{a:g}_r{rounds}_l{local}".format(**model)
            rows[name] = {**model, **score(masks, model)}
    out = args.out or RESULTS / f"mask_crf_{args.split}.json"
    atomic_write_json(out, {"machine": machine(), "threads": 1, "model": model_name,
                            "split": args.split, "scenes": len(masks["greedy"]),
                            "verifier": "shipped" if args.verifier is None else str(args.verifier),
                            "verifier_refines_masks": bool(verifier and verifier.refine_masks),
                            "airplanes": len(masks["top_clamped"]), "rows": rows,
                            "best_by_top_clamped": setting_name(**best),
                            "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
    figure(masks, best, out.with_suffix(".png"))
    for name, row in rows.items():
        print(name, row, flush=True)
    print(f"best by top_clamped: {setting_name(**best)}; wrote {out}")


if __name__ == "__main__":
    main()
