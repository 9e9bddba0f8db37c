"""Time of the first backward pass (category given, one image) of learned models with different
top levels, on the same validation scenes: issue #10's lever 3 (a ``pool3`` top level) beside
the shipped model (``pool4``), at the default ``chunk_elements`` and at a larger one.

A finer top level has more hypotheses (20 γ × 81 δ on ``pool3`` against 20 × 25 on ``pool4``)
on a bigger map; when their template planes (3·T·D·C·H·W elements, ``template_planes``) pass
``chunk_elements`` they are no longer kept whole but rebuilt per chunk of templates on every
call. The calls of all models are interleaved, so every ratio sees the same machine load.

One thread. Writes ``benchmarks/results/clutter_levers/top_level_time.json``.

Usage: ``python benchmarks/top_level_time.py --model PATH [--model PATH ...]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, hidden_bu, interleaved_median_times, machine  # noqa: E402

from pyro_backpass import GenerativeModel, Scenes, greedy_map  # noqa: E402
from pyro_backpass.data import split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.inference import DEFAULT_CHUNK_ELEMENTS  # noqa: E402

CHUNKS = (DEFAULT_CHUNK_ELEMENTS, 4 * DEFAULT_CHUNK_ELEMENTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", type=Path, action="append", default=[],
        help="a model file (repeat); the shipped model is always measured",
    )  # fmt: skip
    parser.add_argument("--scenes", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="one scene, one repeat")
    parser.add_argument(
        "--out", type=Path, default=RESULTS / "clutter_levers" / "top_level_time.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = {"GenerativeModel.default()": GenerativeModel.default()}
    models |= {str(p): GenerativeModel.load(p) for p in args.model}
    if args.smoke:
        args.scenes, args.repeats = 1, 1
    images = [s.image for s in Scenes(args.scenes, seed=split_seed("validation"))]
    fns, info = {}, {}
    for name, gm in models.items():
        bus = [hidden_bu(gm, image) for image in images]
        label = gm.categories.index("airplane")
        top = gm.hidden_levels[-1]
        info[name] = {"top_level": top, "top_hypotheses": gm.site_sizes[f"gamma_{top}"]
                      * gm.site_sizes[f"delta_{top}"]}  # fmt: skip
        for chunk in CHUNKS:

            def run(gm=gm, bus=bus, chunk=chunk, label=label) -> None:
                for bu in bus:
                    greedy_map(gm, bu, category=label, chunk_elements=chunk)

            fns[f"{name} @ chunk_elements={chunk}"] = run
    times = interleaved_median_times(fns, repeats=args.repeats)
    rows = {key: round(t / len(images), 4) for key, t in times.items()}  # seconds per image
    atomic_write_json(args.out, {"machine": machine(), "threads": 1, "split": "validation",
                                 "scenes": len(images), "models": info,
                                 "seconds_per_image": rows})  # fmt: skip
    for key, t in rows.items():
        print(f"{t:.4f} s/image  {key}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
