"""Issue #10, a lever after the pass: **refocus** — run the backward pass again on the scene
shown only around what the first pass found.

The first pass's mask, dilated by ``r`` pixels, selects a region; the scene is shown to the
backbone only there (outside, each channel's median over the image, as
:func:`~pyro_backpass.inference.region_views` does for the descent verifier), and the pass is
run again on that view's activations with the first pass's category and top level (γ, δ)
clamped, so that only the levels below the top re-decide, on an input from which the clutter
away from the object has been removed; ``rounds`` times. It asks whether the levels below the
top (rung (b) of the oracle ladder: 0.42 on test with the shipped model) are limited by the
clutter around the object or by what they can represent.

On cluttered scenes of one split (2–3 airplanes, distractors, clutter; category clamped to
airplane), for each radius:

- ``top_clamped``: mean IoU, against each airplane's visible mask, of the pass with the top
  level clamped to the airplane's own E-step assignment (rung (b)), then refocused;
- ``greedy`` / ``verified``: the first pass of :func:`~pyro_backpass.greedy_map` /
  :func:`~pyro_backpass.verified_map` (the shipped verifier), then refocused: share of scenes
  with IoU ≥ 0.5 / ≥ 0.3 with one of the airplanes, and that pass's mean best IoU;
- ``oracle_view``: the diagnosis beside it — the same top-clamped pass on the scene shown
  only inside the airplane's *true* visible mask dilated by ``r`` (how much of rung (b)'s
  loss the clutter within ``r`` pixels of the object causes, when the region is right);
- beside the reference row, how the top-clamped pass's mask errs: its pixel ``precision``
  and ``recall`` against the visible mask and its area over the true one; its IoU with the
  readout's logit threshold moved (``threshold_sweep``), and with the mask taken as the
  readout's highest-logit pixels, as many as the true visible mask has (``area_oracle``: what
  a perfect size prior would give); ``drift``: the share of those masks that overlap another
  object of the scene (any category) more than their own (IoU); ``gate_<level>_<q>``: the mask
  kept only where F̂ of that level (any channel) exceeds ``q`` × its maximum, repeated up to the
  mask's size and dilated by 2 pixels; ``compete_<m>``: the mask kept only where its readout
  logit is within ``m`` of the highest logit of the other objects of the scene, each from its
  own top-clamped pass with its category (an oracle competition between the scene's objects);
- ``alone``: mean IoU, against the amodal mask, of each airplane alone on the plain
  background (rung (d)), then refocused — the lever must not cost lone objects.

Radius ``none`` is the pass without refocus (the reference row). One thread. Writes
``benchmarks/results/refocus_<split>.json`` and, beside it, a figure (``.png``) of the
top-clamped pass on the first airplane of three scenes: the scene, the true visible mask, the
pass's mask, the refocused view and mask, the oracle view and its pass's mask.

Usage: ``python benchmarks/refocus.py --split validation --scenes 60 --radii 2 4 8 16``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, hidden_bu, learned_model, machine  # noqa: E402

from pyro_backpass import GenerativeModel, MapResult, Scenes, greedy_map, verified_map  # noqa: E402
from pyro_backpass.data import split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.inference import region_views  # noqa: E402
from pyro_backpass.learning import mask_iou, own_top_assignment  # noqa: E402

#: Levels whose F̂ gates the top-clamped mask in ``gate_<level>_<q>``.
GATE_LEVELS: tuple[str, ...] = ("conv2_1", "pool2", "conv3_1", "pool3")
#: Offsets added to the mask readout's fitted logit threshold in ``threshold_sweep``.
THRESHOLDS: tuple[float, ...] = (-1.0, -0.5, 0.0, 0.5, 1.0, 2.0)


def top_pixels(logits: torch.Tensor, n: int) -> torch.Tensor:
    """``(1, H, W)`` bool: the ``n`` pixels of ``logits`` ``(1, H, W)`` with the highest values."""
    flat = logits.flatten()
    out = torch.zeros_like(flat, dtype=torch.bool)
    out[flat.topk(min(n, flat.numel())).indices] = True
    return out.view_as(logits)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """``(B, H, W)`` bool: ``mask`` grown by ``radius`` pixels (a square structuring element)."""
    if radius == 0:
        return mask.bool()
    grown = F.max_pool2d(mask[:, None].float(), 2 * radius + 1, stride=1, padding=radius)
    return grown[:, 0] > 0


@torch.no_grad()
def refocus(
    gm: GenerativeModel, image: torch.Tensor, first: MapResult, *, radius: int, rounds: int = 1
) -> MapResult:
    """The pass of one ``(3, H, W)`` ``image`` again, on the image shown only inside ``first``'s
    mask dilated by ``radius`` pixels, with ``first``'s category and top-level (γ, δ) clamped;
    ``rounds`` times, each round's view from the previous round's mask (always the original
    image's pixels)."""
    if radius < 0 or rounds < 1:
        raise ValueError(f"radius must be >= 0 and rounds >= 1, got {radius}, {rounds}")
    top = gm.hidden_levels[-1]
    sites = ("category", f"gamma_{top}", f"delta_{top}")
    clamp = {s: first.assignment[s] for s in sites}
    result = first
    for _ in range(rounds):
        view = region_views(image, dilate(result.mask, radius))[0]  # (3, H, W)
        result = greedy_map(gm, hidden_bu(gm, view), clamp=clamp)
    return result


def _row(ious_by_scene: list[list[float]]) -> dict:
    best = [max(v) for v in ious_by_scene]
    return {
        "hit@0.5": statistics.mean(b >= 0.5 for b in best),
        "hit@0.3": statistics.mean(b >= 0.3 for b in best),
        "best_iou": statistics.mean(statistics.mean(v) for v in ious_by_scene),
    }


def evaluate(gm: GenerativeModel, scenes: list, radii: list[int | None], *, rounds: int,
             verified: bool) -> dict:  # fmt: skip
    """Every measurement of the module docstring, one row per radius (None: no refocus)."""
    top = gm.hidden_levels[-1]
    airplane = gm.categories.index("airplane")
    label = torch.tensor([airplane])
    key = ["none" if r is None else str(r) for r in radii]
    clamped = {k: [] for k in key}
    oracle = {k: [] for k in key}
    errs = {"precision": [], "recall": [], "area_ratio": [], "area_oracle": [], "drift": []}
    gates = {(lv, q): [] for lv in GATE_LEVELS if lv in gm.hidden_levels for q in (0.0, 0.5)}
    compete = {m: [] for m in (0.0, 1.0, 2.0)}
    sweep = {t: [] for t in THRESHOLDS}
    readout = gm.mask_readout
    alone = {k: [] for k in key}
    free = {name: {k: [] for k in key} for name in ("greedy", "verified") if name != "verified"
            or verified}  # fmt: skip

    def passes(image: torch.Tensor, first: MapResult) -> dict[str, torch.Tensor]:
        return {k: (first if r is None else refocus(gm, image, first, radius=r, rounds=rounds)).mask
                for k, r in zip(key, radii, strict=True)}  # fmt: skip

    n = 0
    for scene in tqdm(scenes, desc="refocus", leave=False):
        planes = [i for i in scene.instances if i.category == "airplane" and i.mask.any()]
        if not planes:
            continue
        n += 1
        bu = hidden_bu(gm, scene.image)
        firsts = {"greedy": greedy_map(gm, bu, category=label)}
        if verified:
            firsts["verified"] = verified_map(gm, bu, category=label)
        for name, first in firsts.items():
            for k, mask in passes(scene.image, first).items():
                free[name][k].append([float(mask_iou(mask, i.mask[None])[0]) for i in planes])
        known = [o for o in scene.instances if o.category in gm.categories and o.mask.any()]
        own_logits = {}  # each known object's readout logits from its own top-clamped pass
        if readout is not None:
            for o in known:
                g, d = own_top_assignment(gm, gm.backbone, o)
                r = greedy_map(gm, bu, category=gm.categories.index(o.category),
                               clamp={f"gamma_{top}": g, f"delta_{top}": d})  # fmt: skip
                own_logits[id(o)] = readout.logits(r.td, bu)[0]  # (H, W)
        for inst in planes:
            gamma, delta = own_top_assignment(gm, gm.backbone, inst)
            first = greedy_map(gm, bu, category=label,
                               clamp={f"gamma_{top}": gamma, f"delta_{top}": delta})  # fmt: skip
            for k, mask in passes(scene.image, first).items():
                clamped[k].append(float(mask_iou(mask, inst.mask[None])[0]))
            m, t = first.mask[0], inst.mask
            inter = float((m & t).sum())
            errs["precision"].append(inter / max(float(m.sum()), 1.0))
            errs["recall"].append(inter / float(t.sum()))
            errs["area_ratio"].append(float(m.sum()) / float(t.sum()))
            own = float(mask_iou(first.mask, t[None])[0])
            others = [float(mask_iou(first.mask, o.mask[None])[0]) for o in scene.instances
                      if o is not inst and o.mask.any()]  # fmt: skip
            errs["drift"].append(float(max(others, default=0.0) > own))
            if readout is not None:
                logits = readout.logits(first.td, bu)  # (1, H, W)
                for th in THRESHOLDS:
                    sweep[th].append(float(mask_iou(logits > readout.threshold + th,
                                                    t[None])[0]))  # fmt: skip
                errs["area_oracle"].append(float(mask_iou(top_pixels(logits, int(t.sum())),
                                                          t[None])[0]))  # fmt: skip
                rivals = [own_logits[id(o)] for o in known if o is not inst]
                best_rival = torch.stack(rivals).amax(0) if rivals else None
                for margin in compete:
                    kept = first.mask if best_rival is None else (
                        first.mask & (logits >= best_rival - margin))  # fmt: skip
                    compete[margin].append(float(mask_iou(kept, t[None])[0]))
            for lv, q in gates:
                x = first.td[lv].amax(dim=1)  # (1, h, w)
                on = F.interpolate((x > q * x.amax()).float()[:, None], size=t.shape)[:, 0] > 0
                gates[lv, q].append(float(mask_iou(first.mask & dilate(on, 2), t[None])[0]))
            for k, r in zip(key, radii, strict=True):
                view = scene.image if r is None else region_views(
                    scene.image, dilate(inst.mask[None], r))[0]  # fmt: skip
                seen = greedy_map(gm, hidden_bu(gm, view), category=label,
                                  clamp={f"gamma_{top}": gamma, f"delta_{top}": delta})  # fmt: skip
                oracle[k].append(float(mask_iou(seen.mask, inst.mask[None])[0]))
            lone = greedy_map(gm, hidden_bu(gm, inst.image_alone), category=label)
            for k, mask in passes(inst.image_alone, lone).items():
                alone[k].append(float(mask_iou(mask, inst.amodal_mask[None])[0]))
    rows = {}
    for k in key:
        rows[k] = {
            "top_clamped": statistics.mean(clamped[k]),
            "oracle_view": statistics.mean(oracle[k]),
            "alone": statistics.mean(alone[k]),
        }
        for name, by_radius in free.items():
            rows[k][name] = _row(by_radius[k])
    diagnosis = {k: statistics.mean(v) for k, v in errs.items() if v}
    diagnosis.update({f"gate_{lv}_{q:g}": statistics.mean(v) for (lv, q), v in gates.items()})
    if readout is not None:
        diagnosis["threshold_sweep"] = {f"{th:+g}": statistics.mean(v) for th, v in sweep.items()}
        diagnosis.update({f"compete_{m:g}": statistics.mean(v) for m, v in compete.items()})
    return {"scenes": n, "airplanes": len(clamped[key[0]]), "rows": rows,
            "top_clamped_errors": diagnosis}  # fmt: skip


def figure(gm: GenerativeModel, scenes: list, path: Path, *, radius: int) -> None:
    """The module docstring's figure, for the first airplane of the first three ``scenes``
    with one, at one dilation ``radius``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyro_backpass.files import atomic_write

    top = gm.hidden_levels[-1]
    label = torch.tensor([gm.categories.index("airplane")])
    picked = [(s, i) for s in scenes for i in s.instances[:1] if i.category == "airplane"
              and i.mask.any()][:3]  # fmt: skip
    titles = ["scene", "true visible mask", "top-clamped pass", f"refocus view (r={radius})",
              "refocused mask", f"oracle view (r={radius})", "its mask"]  # fmt: skip
    fig, axes = plt.subplots(len(picked), len(titles), figsize=(2 * len(titles), 2 * len(picked)),
                             squeeze=False)  # fmt: skip
    for row, (scene, inst) in enumerate(picked):
        gamma, delta = own_top_assignment(gm, gm.backbone, inst)
        clamp = {f"gamma_{top}": gamma, f"delta_{top}": delta}
        first = greedy_map(gm, hidden_bu(gm, scene.image), category=label, clamp=clamp)
        view = region_views(scene.image, dilate(first.mask, radius))[0]
        again = refocus(gm, scene.image, first, radius=radius)
        oracle_view = region_views(scene.image, dilate(inst.mask[None], radius))[0]
        oracle = greedy_map(gm, hidden_bu(gm, oracle_view), category=label, clamp=clamp)
        iou = [float(mask_iou(m, inst.mask[None])[0]) for m in (first.mask, again.mask,
                                                                  oracle.mask)]  # fmt: skip
        panels = [(scene.image, ""), (inst.mask, ""), (first.mask[0], f"IoU {iou[0]:.2f}"),
                  (view, ""), (again.mask[0], f"IoU {iou[1]:.2f}"), (oracle_view, ""),
                  (oracle.mask[0], f"IoU {iou[2]:.2f}")]  # fmt: skip
        for col, (x, text) in enumerate(panels):
            ax = axes[row, col]
            if x.dim() == 3:
                ax.imshow(x.permute(1, 2, 0).clamp(0, 1).numpy())
            else:
                ax.imshow(x.float().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_xlabel(text, fontsize=8)
            if row == 0:
                ax.set_title(titles[col], fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--radii", type=int, nargs="+", default=[2, 4, 8, 16],
                        help="dilation radii, pixels (row 'none' is always measured)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-verified", action="store_true",
                        help="skip verified_map's rows (they need the shipped model)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if any(r < 0 for r in args.radii) or args.rounds < 1 or args.scenes < 1:
        raise SystemExit("--radii must be >= 0, --rounds and --scenes >= 1")
    torch.set_num_threads(1)
    gm, model_name = learned_model(smoke=args.smoke, path=args.model)
    verified = not (args.no_verified or args.smoke or args.model is not None)
    n = 2 if args.smoke else args.scenes
    scenes = list(Scenes(n, seed=split_seed(args.split)))
    start = time.perf_counter()
    result = evaluate(gm, scenes, [None, *args.radii], rounds=args.rounds, verified=verified)
    out = args.out or RESULTS / f"refocus_{args.split}.json"
    atomic_write_json(out, {"machine": machine(), "threads": 1, "model": model_name,
                            "split": args.split, "rounds": args.rounds, **result,
                            "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
    figure(gm, scenes, out.with_suffix(".png"), radius=2)
    for k, row in result["rows"].items():
        print(k, row, flush=True)
    print("top-clamped errors", result["top_clamped_errors"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
