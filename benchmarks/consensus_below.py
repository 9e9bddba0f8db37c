"""Issue #10, rung (b) built in: :func:`~pyro_backpass.consensus_below` after a pass, measured
end to end on cluttered scenes (category clamped to airplane; every mask refined by the colour
CRF, :func:`~pyro_backpass.refine_mask`, its defaults).

Per scene, two passes, each with and without ``consensus_below`` (levels_below=2, 225
completions an image on the default model) after it:

- ``free``: the best first pass measured (:func:`~pyro_backpass.verified_map` with
  ``DescentVerifier.shipped(refined=True)``: the airplane verifier fitted on refined masks,
  choosing by consensus at τ = 0.5). Row: the share of scenes whose refined mask has IoU ≥ 0.5
  / ≥ 0.3 with one of the airplanes' visible masks, and its mean best IoU.
- ``top_clamped`` (rung (b) of the oracle ladder, per airplane): greedy with the top level
  clamped to the airplane's own E-step assignment. Row: the mean IoU with that airplane's
  visible mask (``benchmarks/lower_consensus.py`` measured the same choice from its parts:
  this row is the library's function end to end).

``--workers`` processes of one thread each, scenes split between them. Writes
``benchmarks/results/consensus_below_<split>[_weighted][_keep_empty].json`` (with per-scene
seconds of ``consensus_below``) and a figure of the first test scenes: input, the free
pass's refined mask, and with ``consensus_below``.

Usage: ``python benchmarks/consensus_below.py --split test --scenes 40 --workers 2``
(``--no-top-clamped``: the free pass's rows only)
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
from common import (  # noqa: E402
    RESULTS,
    hidden_bu,
    learned_model,
    machine,
    panel_figure,
    records_in_workers,
)

from pyro_backpass import (  # noqa: E402
    DescentVerifier,
    Scenes,
    consensus_below,
    greedy_map,
    refine_mask,
    verified_map,
)
from pyro_backpass.data import split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.learning import mask_iou, own_top_assignment  # noqa: E402


@torch.no_grad()
def _scene_records(job: tuple) -> list[dict]:
    """One worker's scenes: the free pass's and the top-clamped passes' refined masks' IoUs,
    each without and with ``consensus_below``."""
    split, n, indices, levels_below, top_k, skip_empty, top_clamped, weighted, progress = job
    torch.set_num_threads(1)
    gm, _ = learned_model(smoke=False, path=None)
    verifier = DescentVerifier.shipped(refined=True)
    if verifier is None:
        raise SystemExit("the package has no refined verifier "
                         "(DescentVerifier.shipped(refined=True))")  # fmt: skip
    options = dict(levels_below=levels_below, skip_empty=skip_empty,
                   verifier=verifier if weighted else None)  # fmt: skip
    top = gm.hidden_levels[-1]
    scenes = Scenes(n, seed=split_seed(split))
    out = []
    for i in tqdm(indices, desc=f"{split} scenes", disable=not progress):
        scene = scenes[i]
        planes = [t for t in scene.instances if t.category == "airplane" and t.mask.any()]
        if not planes:
            continue
        truth = torch.stack([t.mask for t in planes])  # (A, H, W)
        bu = hidden_bu(gm, scene.image)
        record = {"scene": i}
        first = verified_map(gm, bu, category="airplane", verifier=verifier, top_k=top_k)
        t = time.perf_counter()
        below = consensus_below(gm, bu, first, **options)
        record["seconds"] = time.perf_counter() - t
        for name, res in (("free", first), ("free_consensus", below)):
            mask = refine_mask(gm, res, bu, scene.image)  # (1, H, W)
            record[name] = float(mask_iou(mask.expand_as(truth), truth).max())
            record[f"{name}_mask"] = mask[0]
        record["top_clamped"], record["top_clamped_consensus"] = [], []
        for inst in planes if top_clamped else []:
            gamma, delta = own_top_assignment(gm, gm.backbone, inst)
            clamp = {f"gamma_{top}": gamma, f"delta_{top}": delta}
            own = greedy_map(gm, bu, category="airplane", clamp=clamp)
            better = consensus_below(gm, bu, own, clamp=clamp, **options)
            for name, res in (("top_clamped", own), ("top_clamped_consensus", better)):
                mask = refine_mask(gm, res, bu, scene.image)
                record[name].append(float(mask_iou(mask, inst.mask[None])[0]))
        record["image"] = scene.image
        out.append(record)
    return out


def hits(ious: list[float]) -> dict:
    return {"hit@0.5": statistics.mean(float(v >= 0.5) for v in ious),
            "hit@0.3": statistics.mean(float(v >= 0.3) for v in ious),
            "iou": statistics.mean(ious)}  # fmt: skip


def figure(records: list[dict], path: Path) -> None:
    """The first four scenes: input, the free pass's refined mask, and with consensus below."""
    rows = [[(r["image"].permute(1, 2, 0).clamp(0, 1), f"scene {r['scene']}"),
             (r["free_mask"], f"verified (IoU {r['free']:.2f})"),
             (r["free_consensus_mask"], f"+ consensus_below (IoU {r['free_consensus']:.2f})")]
            for r in records[:4]]  # fmt: skip
    if rows:
        panel_figure(rows, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=("validation", "test"), default="test")
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--levels-below", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=None,
                        help="the verified pass's descents (default: the verifier's)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--top-clamped", action=argparse.BooleanOptionalAction, default=True,
                        help="also the top-clamped rows (rung (b), per airplane)")  # fmt: skip
    parser.add_argument("--weighted", action="store_true",
                        help="consensus_below(verifier=DescentVerifier.shipped(refined=True)): "
                             "the vote weighted by the refined verifier's scores")  # fmt: skip
    parser.add_argument("--keep-empty", action="store_true",
                        help="consensus_below(skip_empty=False): empty masks vote too")  # fmt: skip
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.scenes < 1 or args.workers < 1 or args.levels_below < 1:
        parser.error("--scenes, --workers and --levels-below must be >= 1")
    torch.set_num_threads(1)
    if args.smoke:  # one scene, one level under the top (5 completions), few descents
        args.scenes, args.levels_below, args.top_k, args.workers = 1, 1, 4, 1
    start = time.perf_counter()

    def job(indices: list[int], first: bool) -> tuple:
        skip = not args.keep_empty
        return (args.split, args.scenes, indices, args.levels_below, args.top_k, skip,
                args.top_clamped, args.weighted, first)  # fmt: skip

    records = records_in_workers(_scene_records, args.scenes, args.workers, job)
    if not records:
        raise SystemExit(f"none of the {args.scenes} {args.split} scenes has an airplane")
    result = {
        "machine": machine(), "threads": 1, "workers": args.workers, "split": args.split,
        "scenes": len(records), "levels_below": args.levels_below, "top_k": args.top_k,
        "skip_empty": not args.keep_empty, "weighted": args.weighted,
        "verifier": repr(DescentVerifier.shipped(refined=True)),
        "free": hits([r["free"] for r in records]),
        "free_consensus": hits([r["free_consensus"] for r in records]),
        "airplanes": sum(len(r["top_clamped"]) for r in records) if args.top_clamped else None,
        "top_clamped": (hits([v for r in records for v in r["top_clamped"]])
                        if args.top_clamped else None),
        "top_clamped_consensus": (hits([v for r in records for v in r["top_clamped_consensus"]])
                                  if args.top_clamped else None),
        "consensus_below_seconds_median": statistics.median(r["seconds"] for r in records),
        "seconds": round(time.perf_counter() - start, 1),
        "per_scene": [{k: v for k, v in r.items() if k != "image" and not k.endswith("_mask")}
                      for r in records],
    }  # fmt: skip
    tail = ("_weighted" if args.weighted else "") + ("_keep_empty" if args.keep_empty else "")
    out = args.out or RESULTS / f"consensus_below_{args.split}{tail}.json"
    atomic_write_json(out, result)
    figure(records, out.with_suffix(".png"))
    print({k: v for k, v in result.items() if k != "per_scene"})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
