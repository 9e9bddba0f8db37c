"""Single objects: does the verified backward pass (issue #10's descent verifier) cost or buy
mask IoU where there is no clutter?

On ``--objects`` held-out test objects per category the verifier is fitted for (the same
objects as ``benchmarks/learning.py``'s single-object IoU, default render scale and scene
scale), the mask IoU of ``greedy_map`` (category given) beside ``verified_map`` with the
shipped verifier (one stage; and, where a second stage is shipped for the category, with it:
``verified_map(..., lower=True)``), and each pass's median time per image. One thread. Writes
``benchmarks/results/verified_objects.json``.

Usage: ``python benchmarks/verified_objects.py --objects 40``
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

from pyro_backpass import DescentVerifier, RenderedObjects, greedy_map, verified_map  # noqa: E402
from pyro_backpass.data import SCENE_SCALE, split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.learning import mask_iou  # noqa: E402


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=40, help="test objects per category")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "verified_objects.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    gm, model_name = learned_model(smoke=False, path=None)
    verifier = DescentVerifier.shipped()
    lower = DescentVerifier.shipped(lower=True)
    if verifier is None:
        raise SystemExit("no shipped descent verifier: run benchmarks/fit_verifier.py --ship")
    n = 1 if args.smoke else args.objects
    rows: dict = {}
    for scale_name, scale in (("default_scale", None), ("scene_scale", SCENE_SCALE)):
        for category in verifier.fitted_categories:
            kw = {} if scale is None else {"scale": scale}
            ds = RenderedObjects(category, n, seed=split_seed("test"), **kw)
            plain, verified, t_plain, t_verified, two, t_two = [], [], [], [], [], []
            staged = lower is not None and category in lower.fitted_categories
            for i in tqdm(range(n), desc=f"{category} {scale_name}", leave=False):
                image, mask = ds[i]
                bu = {k: v for k, v in gm.backbone(image[None]).items() if k in gm.hidden_levels}
                t = time.perf_counter()
                g = greedy_map(gm, bu, category=category)
                t_plain.append(time.perf_counter() - t)
                t = time.perf_counter()
                v = verified_map(gm, bu, category=category, verifier=verifier, lower=False)
                t_verified.append(time.perf_counter() - t)
                if staged:
                    t = time.perf_counter()
                    v2 = verified_map(gm, bu, category=category, lower=True)
                    t_two.append(time.perf_counter() - t)
                    two.append(float(mask_iou(v2.mask, mask[None])[0]))
                plain.append(float(mask_iou(g.mask, mask[None])[0]))
                verified.append(float(mask_iou(v.mask, mask[None])[0]))
            rows.setdefault(scale_name, {})[category] = {
                "objects": n,
                "mask_iou_greedy": statistics.mean(plain),
                "mask_iou_verified": statistics.mean(verified),
                "median_seconds_greedy": statistics.median(t_plain),
                "median_seconds_verified": statistics.median(t_verified),
            }
            if staged:
                rows[scale_name][category].update(
                    mask_iou_two_stage=statistics.mean(two),
                    median_seconds_two_stage=statistics.median(t_two),
                )
            print(scale_name, category, rows[scale_name][category], flush=True)
    atomic_write_json(args.out, {"machine": machine(), "threads": 1, "model": model_name,
                                 "verifier_top_k": verifier.top_k,
                                 "verifier_sha256": verifier.fingerprint(),
                                 "lower_verifier_sha256": None if lower is None
                                 else lower.fingerprint(), "results": rows})  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
