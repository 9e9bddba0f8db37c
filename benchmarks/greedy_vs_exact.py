"""Greedy backward pass vs exact joint MAP (Pyro's infer_discrete) on random models.

For each setting (hidden levels below the category, K, noise) it draws random models with
``GenerativeModel.random``, samples scenes from each model (``sample(..., observe=True)``), and
runs ``greedy_map`` and ``exact_map`` on the same observations. Reported per setting:

* ``agreement``: the fraction of images where greedy's full assignment equals exact's;
* ``logjoint_gap_median`` / ``_max``: exact − greedy log-joint (≥ 0 by construction);
* ``time_greedy_s`` (median of repeats) and ``time_exact_s``, for all images of the setting,
  measured in the same run, and ``speedup`` = exact / greedy.

Noise settings, on the two top hidden levels' observations (greedy decides those first):

* ``model``: data drawn from the model itself;
* ``weak_top``: extra Gaussian noise of standard deviation 1 (about the RMS of φ);
* ``weaker_top``: extra noise of standard deviation 3;
* ``no_top``: those two levels unobserved, so greedy's first decisions rest on the prior alone
  while exact MAP still sees the evidence of the levels below.

Writes ``benchmarks/results/greedy_vs_exact.json``; ``--smoke`` runs a tiny setting in seconds.

Usage: ``python benchmarks/greedy_vs_exact.py [--smoke] [--out PATH]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, median_time  # noqa: E402

from pyro_backpass import GenerativeModel, exact_map, greedy_map, joint_states, sample  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402

# Extra noise on the two top hidden levels' observations; None: leave them unobserved.
NOISE = {"model": 0.0, "weak_top": 1.0, "weaker_top": 3.0, "no_top": None}
# Hidden levels below the category -> backbone config (image is always the lowest level).
CFGS = {2: [4], 3: [4, "M"], 4: [4, "M", 4]}
MAX_STATES = 10**6


def run_setting(levels: int, k: int, noise: str, *, models: int, images: int, size: int,
                categories: int, repeats: int) -> dict:  # fmt: skip
    agree, gaps, t_greedy, t_exact = 0, [], 0.0, 0.0
    states = None
    for m in range(models):
        gm = GenerativeModel.random(CFGS[levels], num_components=k, num_categories=categories,
                                    image_size=size, seed=1000 * levels + 10 * k + m)  # fmt: skip
        states = joint_states(gm)
        s = sample(gm, images, observe=True, seed=m)
        bu = dict(s.bu)
        gen = torch.Generator().manual_seed(m)
        for name in gm.hidden_levels[-2:]:
            if NOISE[noise] is None:
                del bu[name]
            elif NOISE[noise] > 0:
                bu[name] = bu[name] + NOISE[noise] * torch.randn(bu[name].shape, generator=gen)
        t_greedy += median_time(lambda: greedy_map(gm, bu), repeats=repeats)  # noqa: B023
        greedy = greedy_map(gm, bu)
        t = time.perf_counter()
        exact = exact_map(gm, bu)
        t_exact += time.perf_counter() - t
        for i in range(images):
            agree += all(int(greedy.assignment[s_][i]) == int(exact.assignment[s_][i])
                         for s_ in gm.sites)  # fmt: skip
        gaps += (exact.log_joint - greedy.log_joint).tolist()
    trials = models * images
    return {
        "levels": levels,
        "K": k,
        "noise": noise,
        "trials": trials,
        "joint_states": states,
        "agreement": agree / trials,
        "logjoint_gap_median": statistics.median(gaps),
        "logjoint_gap_max": max(gaps),
        "time_greedy_s": t_greedy,
        "time_exact_s": t_exact,
        "speedup": t_exact / t_greedy,
    }


def markdown_table(result: dict) -> str:
    """The README's table, from a results JSON."""
    lines = [
        "| hidden levels | K | noise | joint states | trials | agreement "
        "| log-joint gap median / max | greedy (s) | exact (s) | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["settings"]:
        lines.append(
            f"| {r['levels']} | {r['K']} | {r['noise']} | {r['joint_states']:,} | {r['trials']} "
            f"| {r['agreement']:.0%} "
            f"| {r['logjoint_gap_median']:.3g} / {r['logjoint_gap_max']:.3g} "
            f"| {r['time_greedy_s']:.3f} | {r['time_exact_s']:.1f} | {r['speedup']:.0f}× |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="one tiny setting, seconds")
    p.add_argument("--out", type=Path, default=RESULTS / "greedy_vs_exact.json")
    p.add_argument("--models", type=int, default=3, help="random models per setting")
    p.add_argument("--images", type=int, default=8, help="images per model")
    p.add_argument("--table", action="store_true", help="print --out's results as markdown")
    p.add_argument("--resume", action="store_true", help="keep settings already in --out")
    p.add_argument(
        "--target",
        type=int,
        metavar="RUNS",
        default=0,
        help="repeat the issue's target setting (3 levels, K=4, model noise) RUNS times and write "
        "the spread of its speedup to greedy_vs_exact_target.json",
    )
    args = p.parse_args(argv)
    if args.table:
        import json

        print(markdown_table(json.loads(args.out.read_text())))
        return
    # One thread: timings on a shared 2-core machine are steadier, and both methods get the same.
    torch.set_num_threads(1)
    if args.smoke:
        grid, kw = [(2, 2, "model")], dict(models=1, images=2, size=6, categories=1, repeats=1)
    else:
        grid = [(n, k, noise) for noise in NOISE for n in (2, 3, 4)
                for k in (2, 3, 4, 5)]  # fmt: skip
        kw = dict(models=args.models, images=args.images, size=16, categories=2, repeats=5)
    if args.target:
        kw = dict(models=args.models, images=args.images, size=16, categories=2, repeats=20)
        rows = [run_setting(3, 4, "model", **kw) for _ in range(args.target)]
        speedups = sorted(r["speedup"] for r in rows)
        out = RESULTS / "greedy_vs_exact_target.json"
        atomic_write_json(out, {
            "machine": machine(), "threads": 1, "setting": "levels=3, K=4, noise=model",
            "speedup_median": statistics.median(speedups), "speedup_min": speedups[0],
            "speedup_max": speedups[-1], "agreement_min": min(r["agreement"] for r in rows),
            "runs": rows,
        })  # fmt: skip
        spread = f"{speedups[0]:.0f}-{speedups[-1]:.0f}x"
        print(f"speedup median {statistics.median(speedups):.0f}x, range {spread}; wrote {out}")
        return
    settings = []
    if args.resume and args.out.exists():
        import json

        settings = json.loads(args.out.read_text())["settings"]
    done = {(r["levels"], r["K"], r["noise"]) for r in settings}
    for levels, k, noise in grid:
        if (levels, k, noise) in done:
            continue
        if NOISE[noise] is None and levels <= 2:
            continue  # both hidden levels would be unobserved: nothing to infer from
        gm = GenerativeModel.random(
            CFGS[levels], num_components=k, num_categories=kw["categories"], image_size=kw["size"]
        )
        if joint_states(gm) > MAX_STATES:
            print(f"skip levels={levels} K={k}: {joint_states(gm):,} joint states", flush=True)
            continue
        row = run_setting(levels, k, noise, **kw)
        settings.append(row)
        print(
            f"levels={levels} K={k} noise={noise:8s} states={row['joint_states']:>8,} "
            f"agree={row['agreement']:.2f} gap med={row['logjoint_gap_median']:.3g} "
            f"max={row['logjoint_gap_max']:.3g} greedy={row['time_greedy_s']:.4f}s "
            f"exact={row['time_exact_s']:.2f}s speedup={row['speedup']:.0f}x",
            flush=True,
        )
        # Written after every setting, so an interrupted run keeps what it measured.
        atomic_write_json(args.out, {"machine": machine(), "threads": 1, "settings": settings})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
