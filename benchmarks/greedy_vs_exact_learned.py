"""Greedy vs exact MAP on the learned model: a 3-level sub-hierarchy at the bottom.

The shipped model's full joint is far too large to enumerate, so the three lowest levels'
(γ, δ) — ``pool1``, ``conv1_1``, ``image``: 5·9 · 5 · 5 = 1,125 joint states per image — are
left free and every site above (and the category, given) is clamped to greedy's own choice.
``exact_map`` then finds the joint MAP of those three levels by Pyro's ``infer_discrete``; greedy
chose them level by level. Reported on held-out single objects and cluttered scenes (test
split): the fraction of images where the free sites agree, and the log-joint gap exact − greedy
(≥ 0 by construction).

One thread. Writes ``benchmarks/results/greedy_vs_exact_learned.json``; ``--smoke`` uses a tiny
model and two images.

Usage: ``python benchmarks/greedy_vs_exact_learned.py [--objects N] [--scenes N] [--smoke]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, learned_model, machine  # noqa: E402

from pyro_backpass import GenerativeModel, RenderedObjects, Scenes, exact_map, greedy_map  # noqa: E402
from pyro_backpass.data import split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402


@torch.no_grad()
def compare(gm: GenerativeModel, images: torch.Tensor, labels: torch.Tensor) -> dict:
    free_levels = gm.hidden_levels[:3]
    free = {f"{kind}_{name}" for name in free_levels for kind in ("gamma", "delta")}
    agree, gaps, t_greedy, t_exact = [], [], 0.0, 0.0
    differs = dict.fromkeys(sorted(free), 0)  # site → images where greedy and exact differ
    for i in range(images.shape[0]):
        acts = gm.backbone(images[i : i + 1])
        bu = {k: v for k, v in acts.items() if k in gm.hidden_levels}
        t = time.perf_counter()
        g = greedy_map(gm, bu, category=labels[i : i + 1])
        t_greedy += time.perf_counter() - t
        clamp = {s: v for s, v in g.assignment.items() if s not in free and s != "category"}
        t = time.perf_counter()
        e = exact_map(gm, bu, category=labels[i : i + 1], clamp=clamp,
                      max_memory_bytes=8 * 2**30)  # fmt: skip
        t_exact += time.perf_counter() - t
        same = {s: torch.equal(g.assignment[s], e.assignment[s]) for s in free}
        for site, ok in same.items():
            differs[site] += not ok
        agree.append(all(same.values()))
        gaps.append(float(e.log_joint[0] - g.log_joint[0]))
    n = len(agree)
    return {
        "images": n,
        "free_levels": list(free_levels),
        "agreement": sum(agree) / n,
        "site_disagreement": {site: k / n for site, k in differs.items()},
        "logjoint_gap_median": statistics.median(gaps),
        "logjoint_gap_max": max(gaps),
        "logjoint_gap_min": min(gaps),
        "time_greedy_s": t_greedy / n,
        "time_exact_s": t_exact / n,
    }


def objects(gm: GenerativeModel, n: int):
    images, labels = [], []
    for c, cat in enumerate(gm.categories):
        ds = RenderedObjects(cat, n, seed=split_seed("test"))
        for i in range(n):
            images.append(ds[i][0]), labels.append(c)
    return torch.stack(images), torch.tensor(labels)


def scenes(gm: GenerativeModel, n: int):
    images, labels = [], []
    for scene in Scenes(n, seed=split_seed("test")):
        target = next(inst for inst in scene.instances if inst.is_target)
        images.append(scene.image), labels.append(gm.categories.index(target.category))
    return torch.stack(images), torch.tensor(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=4, help="per category")
    parser.add_argument("--scenes", type=int, default=20)
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "greedy_vs_exact_learned.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    gm, model_name = learned_model(smoke=args.smoke, path=args.model)
    n_obj, n_scenes = (1, 1) if args.smoke else (args.objects, args.scenes)
    if args.smoke:
        x, y = objects(gm, n_obj)
        rows = {"objects": compare(gm, x[:2], y[:2])}
    else:
        rows = {"objects": compare(gm, *objects(gm, n_obj))}
    rows["scenes"] = compare(gm, *scenes(gm, n_scenes))
    result = {
        "machine": machine(),
        "threads": 1,
        "model": model_name,
        "split": "test",
        "results": rows,
        "seconds": round(time.perf_counter() - start, 1),
    }
    atomic_write_json(args.out, result)
    for name, r in rows.items():
        print(f"{name}: {r['images']} images, agreement {r['agreement']:.2f}, gap median "
              f"{r['logjoint_gap_median']:.3g} max {r['logjoint_gap_max']:.3g}, greedy "
              f"{r['time_greedy_s']:.3f} s, exact {r['time_exact_s']:.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
