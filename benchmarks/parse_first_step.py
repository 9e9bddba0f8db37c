"""Issue #11: where the parse's first step goes — with the shipped verifier, and with #10's
refined airplane verifier choosing airplanes' modes (``run_parse(...,
verifier={..., "airplane": DescentVerifier.shipped(refined=True)})``).

On the parse benchmark's scenes (``parsing.py``'s ``parse_scenes``: 2–3 airplanes, 0–3
distractors, clutter, occlusion levels in turn), one step of ``run_parse(image, top_k=100,
max_objects=1, threshold=-inf, refine_masks=True)`` (the first instance the full parse would
report, its masks CRF-refined, its stop statistic the verified criterion's), the category free
and clamped to airplane (``Query(category="airplane")``). Per row: the share of scenes whose
first instance matches a true instance of a known category at visible-mask IoU ≥ 0.5 (``hit``),
one of the airplanes (``hit_airplane``), its category when it matches (``category_right``), and
the category it chose. With the category clamped this is ``verified_consensus.py``'s first pass
(the CRF on its mask) on other scenes.

One thread. Writes ``benchmarks/results/parse_first_step.json``.

Usage: ``python benchmarks/parse_first_step.py [--split test] [--scenes 50] [--smoke]``
"""

from __future__ import annotations

import argparse
import collections
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, learned_model, machine  # noqa: E402
from parsing import parse_scenes  # noqa: E402

from pyro_backpass import DescentVerifier  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.learning import mask_iou  # noqa: E402
from pyro_backpass.parsing import Query, run_parse  # noqa: E402


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=("validation", "test"), default="test")
    parser.add_argument("--scenes", type=int, default=50)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    gm, model_name = learned_model(smoke=False, path=None)
    shipped = DescentVerifier.shipped()
    if shipped is None:
        raise SystemExit("no shipped descent verifier: run benchmarks/fit_verifier.py --ship")
    verifiers = {
        "shipped": shipped,
        "airplane_refined": {**dict.fromkeys(gm.categories, shipped),
                             "airplane": DescentVerifier.shipped(refined=True)},
    }  # fmt: skip
    queries = {"free": None, "airplane": Query(category="airplane")}
    n = 1 if args.smoke else args.scenes
    scenes = parse_scenes(args.split, n)
    rows = {f"{v}_{q}": collections.defaultdict(list) for v in verifiers for q in queries}
    start = time.perf_counter()
    for scene in tqdm(scenes, desc="scenes"):
        known = [t for t in scene.instances if t.category in gm.categories and t.mask.any()]
        truth = torch.stack([t.mask for t in known])  # (n, H, W)
        for vname, verifier in verifiers.items():
            for qname, query in queries.items():
                t = time.perf_counter()
                inst = run_parse(gm, scene.image, top_k=100, max_objects=1, threshold=-math.inf,
                                 refine_masks=True, verifier=verifier,
                                 query=query).instances[0]  # fmt: skip
                iou = mask_iou(inst.mask[None].expand_as(truth), truth)  # (n,)
                best = int(iou.argmax())
                planes = [float(v) for v, t in zip(iou, known, strict=True)
                          if t.category == "airplane"]  # fmt: skip
                row = rows[f"{vname}_{qname}"]
                row["hit"].append(float(iou[best] >= 0.5))
                row["hit_airplane"].append(float(max(planes) >= 0.5))
                row["best_iou"].append(float(iou[best]))
                row["category_right"].append(
                    float(iou[best] >= 0.5 and known[best].category == inst.category)
                )
                row["chose"].append(inst.category)
                row["seconds"].append(time.perf_counter() - t)
    summary = {}
    for name, row in rows.items():
        summary[name] = {k: statistics.mean(v) for k, v in row.items() if k != "chose"}
        summary[name]["chose"] = dict(collections.Counter(row["chose"]))
        summary[name]["median_seconds"] = statistics.median(row["seconds"])
        del summary[name]["seconds"]
    out = args.out or RESULTS / "parse_first_step.json"
    atomic_write_json(out, {"machine": machine(), "threads": 1, "model": model_name,
                            "split": args.split, "scenes": n, "top_k": 100, "rows": summary,
                            "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
    for name, s in summary.items():
        print(name, {k: v for k, v in s.items()})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
