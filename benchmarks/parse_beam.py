"""What beam search buys over the greedy parse, on a handful of validation scenes.

Each scene (plain: 2-3 airplanes alone; cluttered: plus 0-3 distractors and clutter) is parsed
with ``beam=1`` and ``beam=4`` for as many steps as it has objects (``max_objects``, the stop
criterion off), so both return the same number of instances. Reported per beam: instance
recall at mask IoU >= 0.5 (greedy one-to-one matching, better of visible and amodal IoU), the
summed stop statistic of the parse (the beam's objective, ``ParsedInstance.score``), its summed
log-likelihood ratio against background and seconds per scene.

One thread. Writes ``benchmarks/results/parse_beam.json``.

Usage: ``python benchmarks/parse_beam.py [--scenes N] [--smoke]``
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine  # noqa: E402
from parse_threshold import REGIMES, label_steps, scene_options  # noqa: E402

SEED = 12  # split_seed("validation", SEED): other scenes than the threshold's


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenes", type=int, default=6, help="per regime")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "parse_beam.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from pyro_backpass import GenerativeModel, make_scene, run_parse, split_seed
    from pyro_backpass.files import atomic_write_json

    gm = GenerativeModel.default()
    n = 1 if args.smoke else args.scenes
    seed = split_seed("validation", SEED)
    rng = np.random.default_rng(seed)
    out: dict = {"machine": machine(), "smoke": args.smoke, "split": "validation",
                 "seed": f"split_seed('validation', {SEED}) = {seed}", "scenes_per_regime": n,
                 "beams": {}}  # fmt: skip
    beams = (1, 2) if args.smoke else (1, 4)
    scenes = {r: [make_scene(**scene_options(rng, r), seed=(seed, k, i)) for i in range(n)]
              for k, r in enumerate(REGIMES)}  # fmt: skip
    for beam in beams:
        row: dict = {}
        for regime, items in scenes.items():
            hits = truth = 0
            llr, stat, secs = [], [], []
            for scene in items:
                steps = 1 if args.smoke else len(scene.instances)
                start = time.perf_counter()
                parse = run_parse(gm, scene.image, max_objects=steps, beam=beam,
                                  threshold=-math.inf)  # fmt: skip
                secs.append(time.perf_counter() - start)
                hits += sum(label_steps(parse, scene))
                truth += len(scene.instances)
                llr.append(sum(i.llr for i in parse.instances))
                stat.append(sum(i.score for i in parse.instances))
            row[regime] = {"recall_iou50": hits / truth, "mean_summed_score": float(np.mean(stat)),
                           "mean_summed_llr": float(np.mean(llr)),
                           "seconds_per_scene": float(np.mean(secs))}  # fmt: skip
            print(f"beam {beam} {regime:9s} recall {hits / truth:.3f}  summed score "
                  f"{np.mean(stat):8.2f}  summed LLR {np.mean(llr):10.1f}  "
                  f"{np.mean(secs):.1f} s/scene", flush=True)  # fmt: skip
        out["beams"][str(beam)] = row
    atomic_write_json(args.out, out)
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
