"""Issue #10, rung (b) — does a consensus among the completions below a clamped top level find
the airplane better than greedy's own completion?

For each airplane of cluttered scenes of one split (category clamped to airplane), the top
level is clamped to the airplane's own E-step assignment (rung (b) of the oracle ladder) and
every joint (γ, δ) of the two levels under it is completed
(:func:`~pyro_backpass.inference.lower_completions`, 225 on the default model); each
completion's mask is refined by the colour CRF (``crf_mask``, the library's defaults). Rows,
each the mean IoU with the airplane's visible mask:

- ``greedy``: greedy's own completion (rung (b) with the CRF, as ``mask_crf.py`` measures it);
- ``log_joint``: the completion of the largest log-joint;
- ``consensus_T``: the completion of highest :func:`~pyro_backpass.inference.expected_iou`
  under softmax(log-joint / T) (T = inf: uniform);
- ``best``: the best of the completions by IoU (the bound of any choice among them);
- ``…_nonempty``: a consensus row with the completions whose refined mask is empty left out
  (they agree perfectly with each other, so under a top level that misses the object they
  can outvote every mask that shows something); all of them if every mask is empty.

With ``--verifier`` also, scored by the shipped refined first-stage verifier
(``DescentVerifier.shipped(refined=True)``: fitted on the refined masks of greedy's top-level
descents, airplane) from each completion's :func:`~pyro_backpass.inference.descent_features`
(refined masks, as it was fitted):

- ``verifier_argmax``: the completion it scores highest;
- ``verifier_consensus_τ``: the highest expected IoU under softmax(score / τ).

And two ways of deciding a mask from the vote that need not be any completion's (at the
library's temperature, :data:`~pyro_backpass.inference.LOWER_TEMPERATURE`, empty masks left
out; ``uniform_…`` the same with uniform weights):

- ``aggregate_marginal_…``: the pixels that at least half the vote's weight puts in the mask
  (the weighted per-pixel marginal thresholded at 0.5);
- ``aggregate_mbr_…``: the mask of highest expected IoU under the vote among the completions'
  masks *and* every threshold of that marginal (:func:`mbr_mask`; the minimum-Bayes-risk
  decision for IoU searched over a larger set, Nowozin 2014), never below the consensus's
  expected IoU.

These two can exceed ``best``.

One thread. Writes ``benchmarks/results/lower_consensus_<split>.json``.

Usage: ``python benchmarks/lower_consensus.py --split validation --scenes 30`` (split between
two processes: ``--scenes 15`` and ``--scenes 30 --first 15``, then ``--merge A B --out C``)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, hidden_bu, learned_model, machine  # noqa: E402

from pyro_backpass import DescentVerifier, Scenes, greedy_map  # noqa: E402
from pyro_backpass.data import split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.inference import (  # noqa: E402
    LOWER_TEMPERATURE,
    crf_mask,
    expected_iou,
    lower_completions,
    lower_descent_features,
)
from pyro_backpass.learning import mask_iou, own_top_assignment  # noqa: E402

TEMPERATURES = (1.0, 10.0, 100.0, math.inf)
VERIFIER_TEMPERATURES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def mbr_mask(masks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` bool: of ``masks`` ``(k, H, W)`` and every threshold ``marginal >= l`` of their
    ``weights``-weighted per-pixel marginal (l each distinct positive value of it), the mask of
    highest expected IoU with ``masks`` under ``weights`` (the IoU of two empty masks 1; ties:
    the completions first, then the lower thresholds)."""
    flat = masks.flatten(1).to(torch.float64)  # (k, N)
    marginal = weights.to(flat) @ flat  # (N,)
    levels = torch.unique(marginal)
    thresholds = marginal[None] >= levels[levels > 0][:, None]  # (L, N)
    candidates = torch.cat([masks.flatten(1), thresholds])  # (k + L, N)
    # The thresholds join the vote with weight 0: each candidate's expected IoU with the masks.
    voting = torch.cat([weights.to(flat), flat.new_zeros(len(thresholds))])
    best = int(expected_iou(candidates.view(-1, *masks.shape[1:]), voting).argmax())
    return candidates[best].view(masks.shape[1:])


def merge(parts: list[Path], out: Path) -> None:
    """One result from runs on disjoint scene ranges of one split (``--first``): each row's
    mean over all their airplanes."""
    runs = [json.loads(p.read_text()) for p in parts]
    if len({r["split"] for r in runs}) != 1 or len({r.get("verifier") for r in runs}) != 1:
        raise SystemExit("--merge takes runs of one split and one verifier")
    ranges = sorted((r.get("first", 0), r["scenes"]) for r in runs)
    if any(a[1] != b[0] for a, b in zip(ranges, ranges[1:], strict=False)) or ranges[0][0] != 0:
        raise SystemExit(f"--merge needs contiguous scene ranges from 0, got {ranges}")
    n = sum(r["airplanes"] for r in runs)
    rows = set.intersection(*(set(r["mean_iou"]) for r in runs))
    merged = {k: sum(r["mean_iou"][k] * r["airplanes"] for r in runs) / n for k in sorted(rows)}
    atomic_write_json(out, {**runs[0], "scenes": ranges[-1][1], "first": 0, "airplanes": n,
                            "mean_iou": merged, "seconds": sum(r["seconds"] for r in runs),
                            "merged_from": [p.name for p in parts]})  # fmt: skip
    print(merged)
    print(f"wrote {out}")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--scenes", type=int, default=30)
    parser.add_argument("--first", type=int, default=0,
                        help="start at this scene (scenes --first … --scenes - 1; to split a "
                             "run between processes)")  # fmt: skip
    parser.add_argument("--verifier", action="store_true",
                        help="also choose by the shipped refined verifier's scores")  # fmt: skip
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="only merge these results of disjoint scene ranges into --out",
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.merge:
        if args.out is None:
            parser.error("--merge needs --out")
        merge(args.merge, args.out)
        return
    if args.scenes < 1:
        parser.error("--scenes must be >= 1")
    torch.set_num_threads(1)
    gm, model_name = learned_model(smoke=False, path=None)
    top = gm.hidden_levels[-1]
    n = 1 if args.smoke else args.scenes
    scenes = Scenes(n, seed=split_seed(args.split))
    rows: dict[str, list[float]] = {"greedy": [], "log_joint": [], "best": []}
    rows.update({f"consensus_{t:g}": [] for t in TEMPERATURES})
    rows["consensus_inf_nonempty"] = []
    verifier = DescentVerifier.shipped(refined=True) if args.verifier else None
    if verifier is not None:
        rows["verifier_argmax"] = []
        rows.update({f"verifier_consensus_{t:g}{e}": [] for t in VERIFIER_TEMPERATURES
                     for e in ("", "_nonempty")})  # fmt: skip
    for prefix in ("", "uniform_") if verifier is not None else ("uniform_",):
        rows.update({f"aggregate_{rule}_{prefix}nonempty": [] for rule in ("marginal", "mbr")})

    def aggregate(prefix: str, voters: torch.Tensor, w: torch.Tensor, truth: torch.Tensor) -> None:
        marginal = ((w.to(torch.float64) @ voters.flatten(1).double()) >= 0.5).view_as(truth)
        rows[f"aggregate_marginal_{prefix}nonempty"].append(float(mask_iou(marginal, truth)[0]))
        best = mbr_mask(voters, w)[None]
        rows[f"aggregate_mbr_{prefix}nonempty"].append(float(mask_iou(best, truth)[0]))

    # The smoke preset enumerates one level under the top (5 completions), not two (225).
    levels_below = 1 if args.smoke else min(2, len(gm.hidden_levels) - 1)
    start = time.perf_counter()
    if not 0 <= args.first < n:
        parser.error("--first must be in [0, --scenes)")
    for i in tqdm(range(args.first, n), desc="scenes"):
        scene = scenes[i]
        bu = hidden_bu(gm, scene.image)
        for inst in [t for t in scene.instances if t.category == "airplane" and t.mask.any()]:
            gamma, delta = own_top_assignment(gm, gm.backbone, inst)
            below = lower_completions(gm, bu, category="airplane",
                                      top={f"gamma_{top}": gamma, f"delta_{top}": delta},
                                      levels_below=levels_below)  # fmt: skip
            ok = torch.isfinite(below.log_joint)
            td = {k: v[ok] for k, v in below.td.items()}
            lj = below.log_joint[ok].double()
            masks = crf_mask(gm, td, bu, scene.image)  # (m, H, W)
            iou = mask_iou(masks, inst.mask[None].expand_as(masks))  # (m,)
            first = greedy_map(gm, bu, category="airplane",
                               clamp={f"gamma_{top}": gamma, f"delta_{top}": delta})  # fmt: skip
            own = crf_mask(gm, first.td, bu, scene.image)
            rows["greedy"].append(float(mask_iou(own, inst.mask[None])[0]))
            rows["log_joint"].append(float(iou[int(lj.argmax())]))
            rows["best"].append(float(iou.max()))
            shows = masks.flatten(1).any(1)  # (m,)
            if not shows.any():
                shows = torch.ones_like(shows)
            idx = shows.nonzero()[:, 0]
            if verifier is not None:
                chosen = {"category": gm.categories.index("airplane"),
                          f"gamma_{top}": gamma, f"delta_{top}": delta}  # fmt: skip
                _, x, v_masks = lower_descent_features(
                    gm, bu, chosen, levels_below=levels_below,
                    read_levels=verifier.read_levels, refine=True)  # fmt: skip
                if not torch.equal(v_masks, masks):
                    raise SystemExit("the verifier's refined masks differ from crf_mask's")
                score = verifier.score(x, chosen["category"]).double()
                w = torch.softmax(score[idx] / LOWER_TEMPERATURE, 0)
                aggregate("", masks[idx], w, inst.mask[None])
                rows["verifier_argmax"].append(float(iou[int(score.argmax())]))
                for t in VERIFIER_TEMPERATURES:
                    w = torch.softmax(score / t, 0)
                    pick = int(expected_iou(masks, w).argmax())
                    rows[f"verifier_consensus_{t:g}"].append(float(iou[pick]))
                    w = torch.softmax(score[idx] / t, 0)
                    pick = idx[int(expected_iou(masks[idx], w).argmax())]
                    rows[f"verifier_consensus_{t:g}_nonempty"].append(float(iou[pick]))
            for t in TEMPERATURES:
                w = (
                    torch.full_like(lj, 1.0 / len(lj))
                    if math.isinf(t)
                    else torch.softmax(lj / t, 0)
                )
                rows[f"consensus_{t:g}"].append(float(iou[int(expected_iou(masks, w).argmax())]))
            w = torch.full((len(idx),), 1.0 / len(idx), dtype=torch.float64)
            pick = idx[int(expected_iou(masks[idx], w).argmax())]
            rows["consensus_inf_nonempty"].append(float(iou[pick]))
            aggregate("uniform_", masks[idx], w, inst.mask[None])
    summary = {k: statistics.mean(v) for k, v in rows.items() if v}
    out = args.out or RESULTS / f"lower_consensus_{args.split}.json"
    atomic_write_json(out, {"machine": machine(), "threads": 1, "model": model_name,
                            "split": args.split, "scenes": n, "first": args.first,
                            "verifier": repr(verifier) if verifier is not None else None,
                            "airplanes": len(rows["greedy"]), "levels_below": levels_below,
                            "mean_iou": summary,
                            "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
    print(summary)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
