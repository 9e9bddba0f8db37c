"""Do other cues add to the descent verifier's choice (issue #10)? Two candidates, measured
before building either into the verifier:

- ``class_map``: the backbone's class map where each descent's top level centres the object
  (:func:`~pyro_backpass.class_map_prior`'s log-weights at weight 1; lever 3 × the verified
  pass);
- analysis by synthesis of each descent's region: the backward pass (category clamped) on
  :func:`~pyro_backpass.inference.region_views` of the descent's mask — the region alone on
  the image's median colour — scored by its log-likelihood ratio against the all-background
  explanation (``region_llr``; also ÷ the mask's pixels, ``region_llr_per_pixel``) and by the
  IoU of its own mask with the descent's (``region_consistency``).

On ``--scenes`` validation scenes, category clamped to airplane, greedy's ``top_k`` completed
descents (the verifier's own ``top_k``) are scored by the ``--verifier`` (default: the shipped
one) and by each cue. Each choice is the highest-scored descent; reported as the share of
scenes whose choice hits an airplane (visible mask IoU ≥ 0.5 / 0.3):

- ``bound``: the best descent of the list by IoU (what any choice among them can reach);
- ``verifier``: the verifier alone (``verified_map``'s first stage);
- ``log_joint``: the largest completed log-joint (``greedy_map(top_k=k)``);
- each cue alone (ties broken by the verifier), and its mean within-list correlation with the
  descents' IoU (``correlation_with_iou``; the verifier's too);
- ``verifier + a·cue``: for each ``a`` in ``--weights``, on the raw scores and on scores
  standardised within each scene's list (``z``);
- ``verifier_choice_mask``: the mean precision and recall of the verifier's choice's mask
  against the airplane it overlaps most;
- ``cross_validated``: per cue, ``a`` chosen among 0 (the verifier alone) and ``--weights`` on
  one half of the scenes (even / odd) for the raw sum, scored on the other; beside it the
  verifier alone on the same halves (``verifier_halves``).

Writes ``benchmarks/results/clutter_levers/verifier_cues_<name>.json``. One thread.

Usage: ``python benchmarks/verifier_cues.py [--model PATH] [--verifier FILE] --name shipped``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, learned_model, machine  # noqa: E402

from pyro_backpass import (  # noqa: E402
    DescentVerifier,
    GenerativeModel,
    Scenes,
    class_map_prior,
    fit_descent_verifier,
    greedy_map,
)
from pyro_backpass.data import split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.inference import (  # noqa: E402
    background_log_likelihood,
    descent_features,
    mode_values,
    region_views,
)
from pyro_backpass.learning import mask_iou  # noqa: E402


@torch.no_grad()
def scene_lists(gm: GenerativeModel, verifier: DescentVerifier, scenes) -> list[dict]:
    """Per scene with an airplane: the descents' verifier scores, cues (see the module
    docstring), completed log-joints and best IoU with an airplane (each ``(k,)``)."""
    top = gm.hidden_levels[-1]
    airplane = gm.categories.index("airplane")
    out = []
    for scene in tqdm(scenes, desc="descents", leave=False):
        planes = [i for i in scene.instances if i.category == "airplane" and i.mask.any()]
        if not planes:
            continue
        acts = gm.backbone(scene.image[None])
        bu = {k: v for k, v in acts.items() if k in gm.hidden_levels}
        result = greedy_map(gm, bu, category=airplane, top_k=verifier.top_k)
        values, log_joints = mode_values(result.modes[0], list(result.assignment),
                                         device=gm.device)  # fmt: skip
        x, masks = descent_features(gm, bu, values, log_joints, read_levels=verifier.read_levels)
        cam = class_map_prior(gm, acts, airplane, weight=1.0).log_probs()
        views = gm.backbone(region_views(scene.image.clamp(0, 1), masks))  # k regions alone
        views = {k: v for k, v in views.items() if k in gm.hidden_levels}
        region = greedy_map(gm, views, category=airplane)
        region_llr = region.log_joint - background_log_likelihood(gm, views)
        pixels = masks.flatten(1).sum(1).clamp_min(1).to(region_llr.dtype)
        iou = torch.stack([mask_iou(masks, p.mask[None].expand_as(masks)) for p in planes])
        best = iou.argmax(0)  # (k,) each descent's airplane
        truth = torch.stack([p.mask for p in planes])[best]  # (k, H, W)
        inter = (masks & truth).flatten(1).sum(1).double()
        out.append({
            "verifier": verifier.score(x.cpu(), airplane).double(),
            "class_map": cam[values[f"delta_{top}"]].cpu().double(),
            "region_llr": region_llr.cpu().double(),
            "region_llr_per_pixel": (region_llr / pixels).cpu().double(),
            "region_consistency": mask_iou(region.mask, masks).cpu().double(),
            "log_joint": log_joints.double(),
            "iou": iou.amax(0).cpu(),
            "precision": (inter / masks.flatten(1).sum(1).clamp_min(1)).cpu(),
            "recall": (inter / truth.flatten(1).sum(1).clamp_min(1)).cpu(),
        })  # fmt: skip
    return out


def hit_rates(lists: list[dict], score) -> dict:
    """Share of scenes whose highest-``score``d descent hits at IoU ≥ 0.5 / 0.3."""
    picked = [float(s["iou"][int(score(s).argmax())]) for s in lists]
    return {"hit@0.5": statistics.mean(p >= 0.5 for p in picked),
            "hit@0.3": statistics.mean(p >= 0.3 for p in picked)}  # fmt: skip


def _z(t: torch.Tensor) -> torch.Tensor:
    return (t - t.mean()) / t.std().clamp_min(1e-9)


CUES = ("class_map", "region_llr", "region_llr_per_pixel", "region_consistency")


def combined(cue: str, a: float, standardised: bool):
    if standardised:
        return lambda s: _z(s["verifier"]) + a * _z(s[cue])
    return lambda s: s["verifier"] + a * s[cue]


def correlation(lists: list[dict], key: str) -> float:
    """Mean over lists of the Pearson correlation of ``key`` with the descents' IoU (lists
    where either is constant left out; NaN if none is left)."""
    values = []
    for s in lists:
        x, y = s[key].double(), s["iou"].double()
        if x.std() > 0 and y.std() > 0:
            values.append(float(torch.corrcoef(torch.stack([x, y]))[0, 1]))
    return statistics.mean(values) if values else float("nan")


def choices(lists: list[dict], weights: list[float], cues: tuple[str, ...] = CUES) -> dict:
    chosen = [int(s["verifier"].argmax()) for s in lists]
    halves = [hit_rates(lists[held::2], lambda s: s["verifier"])
              for held in (0, 1) if lists[held::2] and lists[1 - held :: 2]]  # fmt: skip
    rows: dict = {
        "verifier_halves": halves,
        "verifier_choice_mask": {
            k: statistics.mean(float(s[k][i]) for s, i in zip(lists, chosen, strict=True))
            for k in ("precision", "recall")
        },
        "bound": hit_rates(lists, lambda s: s["iou"]),
        "verifier": hit_rates(lists, lambda s: s["verifier"]),
        "log_joint": hit_rates(lists, lambda s: s["log_joint"]),
        "correlation_with_iou": {k: correlation(lists, k) for k in ("verifier", *cues)},
        "cross_validated": {},
    }
    for cue in cues:
        rows[cue] = hit_rates(lists, lambda s, cue=cue: s[cue] + 1e-6 * _z(s["verifier"]))
        for a in weights:
            rows[f"verifier + {a:g}·{cue}"] = hit_rates(lists, combined(cue, a, False))
            rows[f"z(verifier) + {a:g}·z({cue})"] = hit_rates(lists, combined(cue, a, True))
        folds = []
        for held in (0, 1):
            fit, score = lists[1 - held :: 2], lists[held::2]
            if not fit or not score:
                continue

            def fit_rate(a: float, cue: str = cue, fit: list = fit) -> float:
                return hit_rates(fit, combined(cue, a, False))["hit@0.5"]

            best = max((0.0, *weights), key=fit_rate)  # 0: the verifier alone
            folds.append({"a": best, "scenes": len(score),
                          **hit_rates(score, combined(cue, best, False))})  # fmt: skip
        rows["cross_validated"][cue] = folds
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--verifier", type=Path, default=None, help="default: the shipped one")
    parser.add_argument("--name", required=True, help="names the results file")
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1, 3, 10])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.scenes < 1 or not args.name.isidentifier():
        raise SystemExit("--scenes must be >= 1 and --name a plain identifier")
    torch.set_num_threads(1)
    gm, model_name = learned_model(smoke=args.smoke, path=args.model)
    if args.verifier is not None:
        verifier = DescentVerifier.load(args.verifier)
    elif args.smoke:
        train = list(Scenes(8, seed=split_seed("train")))
        # The smoke model rarely reaches IoU 0.5: any overlap counts as a hit for its fit.
        verifier = fit_descent_verifier(gm, train, top_k=3, categories=["airplane"], hit_iou=0.01)
    else:
        verifier = DescentVerifier.shipped()
    start = time.perf_counter()
    lists = scene_lists(gm, verifier, Scenes(args.scenes, seed=split_seed("validation")))
    rows = choices(lists, args.weights)
    out = args.out or RESULTS / "clutter_levers" / f"verifier_cues_{args.name}.json"
    atomic_write_json(out, {
        "machine": machine(), "threads": 1, "model": model_name,
        "verifier": str(args.verifier) if args.verifier else "shipped",
        "top_k": verifier.top_k, "scenes_with_airplanes": len(lists), "choices": rows,
        "seconds": round(time.perf_counter() - start, 1),
    })  # fmt: skip
    for k, v in rows.items():
        print(k, v)


if __name__ == "__main__":
    main()
