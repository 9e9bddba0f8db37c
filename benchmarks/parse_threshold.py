"""The scene parser's stop criterion, fitted on validation scenes (never the test split).

Each validation scene (2-3 airplanes, 0-3 distractors of other known categories, clutter) is
parsed with no stop (``threshold=-inf``) for a few more steps than it has objects; every step
is labelled "new object" when its instance matches a not-yet-matched true instance at mask IoU
>= 0.5 (the better of visible-vs-visible and amodal-vs-amodal), else "nothing new". The step's
statistic is its log-likelihood ratio (LLR) against an all-background explanation, for two
backgrounds (``profile``: φ = 0 with each element maximised as in eq. 13; ``off``: every element
off) and two ways of explaining a found object away (``subtract``, ``unobserve``). Reported:
the ROC of "LLR > t" for "new object" per setting (AUC), and, per setting, the threshold that
maximises the micro F1 of the instances a parse keeps when it stops at the first step below t.
The setting with the best F1 is shipped in ``pyro_backpass/weights/parse_threshold.json`` (with
its provenance) as the parser's default.

One thread. Writes ``benchmarks/results/parse_threshold.json`` and ``parse_threshold_roc.png``.

Usage: ``python benchmarks/parse_threshold.py [--scenes N] [--smoke]``
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

PACKAGE_FILE = Path(__file__).parents[1] / "pyro_backpass" / "weights" / "parse_threshold.json"
SEED = 11  # base seed of the validation scenes: split_seed("validation", SEED)
IOU = 0.5


def scene_options(rng: np.random.Generator, regime: str) -> dict:
    """``cluttered``: the issue's scenes (2-3 airplanes, 0-3 distractors, clutter); ``plain``:
    2-3 airplanes alone on a plain background (where the shipped model can find objects)."""
    n = int(rng.integers(2, 4))
    if regime == "plain":
        return {"targets": ("airplane",) * n, "distractors": 0, "clutter": False}
    return {"targets": ("airplane",) * n, "distractors": int(rng.integers(0, 4))}


REGIMES = ("cluttered", "plain")


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 0.0


def label_steps(parse, scene) -> list[bool]:
    """Per step: does its instance match a not-yet-matched true instance at IoU >= 0.5?"""
    free = list(range(len(scene.instances)))
    labels = []
    for inst in parse.instances:
        best, which = 0.0, None
        for k in free:
            t = scene.instances[k]
            v = max(iou(inst.mask, t.mask), iou(inst.amodal_mask, t.amodal_mask))
            if v > best:
                best, which = v, k
        hit = which is not None and best >= IOU
        if hit:
            free.remove(which)
        labels.append(hit)
    return labels


def roc(scores: list[float], labels: list[bool]) -> dict:
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    pos, neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    tpr = np.concatenate([[0.0], np.cumsum(y) / pos])
    fpr = np.concatenate([[0.0], np.cumsum(~y) / neg])
    auc = float(np.trapezoid(tpr, fpr)) if y.any() and (~y).any() else float("nan")
    return {"fpr": fpr.round(4).tolist(), "tpr": tpr.round(4).tolist(), "auc": auc,
            "positives": int(y.sum()), "negatives": int((~y).sum())}  # fmt: skip


def fit_threshold(runs: list[tuple[list[float], list[bool], int]]) -> dict:
    """The t maximising micro F1 when each parse stops at its first step with LLR <= t.

    ``runs``: per scene (step LLRs, step labels, number of true instances)."""
    all_scores = sorted({s for r in runs for s in r[0]})
    cands = [-math.inf] + [
        (a + b) / 2 for a, b in zip(all_scores[:-1], all_scores[1:], strict=True)
    ]
    cands += [all_scores[-1] + 1.0] if all_scores else []
    best = None
    for t in cands:
        tp = kept = truth = exact = 0
        for scores, labels, n_true in runs:
            n = next((i for i, s in enumerate(scores) if s <= t), len(scores))
            tp += sum(labels[:n])
            kept += n
            truth += n_true
            exact += n == n_true
        prec, rec = tp / max(kept, 1), tp / max(truth, 1)
        f1 = 2 * prec * rec / max(prec + rec, 1e-12)
        row = {"threshold": t, "f1": f1, "precision": prec, "recall": rec,
               "count_accuracy": exact / max(len(runs), 1)}  # fmt: skip
        if best is None or f1 > best["f1"] + 1e-12:
            best = row
    return best


def summarise(runs: list[tuple[list[float], list[bool], int]]) -> dict:
    flat_s = [s for r in runs for s in r[0]]
    flat_y = [y for r in runs for y in r[1]]
    return {
        "roc": roc(flat_s, flat_y), "fit": fit_threshold(runs),
        "steps": [{"scores": [round(s, 2) for s in r[0]], "labels": r[1], "objects": r[2]}
                  for r in runs],
    }  # fmt: skip


def report(name: str, row: dict) -> None:
    fit = row["fit"]
    print(f"{name:30s} AUC {row['roc']['auc']:.3f}  t={fit['threshold']:.1f} "
          f"F1 {fit['f1']:.3f} P {fit['precision']:.3f} R {fit['recall']:.3f} "
          f"count acc {fit['count_accuracy']:.3f}", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenes", type=int, default=30, help="per regime")
    p.add_argument("--smoke", action="store_true", help="2 scenes, 2 steps, nothing shipped")
    p.add_argument("--out", type=Path, default=RESULTS / "parse_threshold.json")
    p.add_argument("--figure", type=Path, default=RESULTS / "parse_threshold_roc.png")
    p.add_argument("--package-file", type=Path, default=PACKAGE_FILE)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyro_backpass import GenerativeModel, make_scene
    from pyro_backpass.data import split_seed
    from pyro_backpass.files import atomic_write, atomic_write_json
    from pyro_backpass.parsing import model_fingerprint, run_parse

    gm = GenerativeModel.default()
    n_scenes = 2 if args.smoke else args.scenes
    seed = split_seed("validation", SEED)
    rng = np.random.default_rng(seed)
    scenes = {
        regime: [make_scene(**scene_options(rng, regime), seed=(seed, r, i))
                 for i in range(n_scenes)]
        for r, regime in enumerate(REGIMES)
    }  # fmt: skip
    settings = [(e, b) for e in ("subtract", "unobserve") for b in ("profile", "off")]
    out: dict = {"machine": machine(), "smoke": args.smoke, "split": "validation",
                 "seed": f"split_seed('validation', {SEED}) = {seed}", "scenes": n_scenes,
                 "iou": IOU, "settings": {}}  # fmt: skip
    start = time.perf_counter()
    for explain, background in settings:
        key = f"{explain}/{background}"
        row: dict = {"explain_away": explain, "background": background, "regimes": {}}
        pooled = []
        for regime in REGIMES:
            runs = []
            for scene in scenes[regime]:
                n_true = len(scene.instances)
                steps = 2 if args.smoke else min(n_true + 2, 6)
                parse = run_parse(gm, scene.image, max_objects=steps, threshold=-math.inf,
                                  explain=explain, background=background)  # fmt: skip
                runs.append(([i.score for i in parse.instances], label_steps(parse, scene),
                             n_true))  # fmt: skip
            pooled += runs
            row["regimes"][regime] = summarise(runs)
            report(f"{key} {regime}", row["regimes"][regime])
        row["pooled"] = summarise(pooled)
        report(f"{key} pooled", row["pooled"])
        out["settings"][key] = row
    out["seconds"] = round(time.perf_counter() - start, 1)
    # The setting and threshold shipped: best F1 on the pooled validation scenes of both regimes.
    best_key = max(out["settings"], key=lambda k: out["settings"][k]["pooled"]["fit"]["f1"])
    best = {**out["settings"][best_key]["pooled"], **out["settings"][best_key]}
    out["chosen"] = best_key

    fig, axes = plt.subplots(1, len(REGIMES) + 1, figsize=(4 * (len(REGIMES) + 1), 4))
    for ax, regime in zip(axes, [*REGIMES, "pooled"], strict=True):
        for key, row in out["settings"].items():
            r = row["pooled"] if regime == "pooled" else row["regimes"][regime]
            ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], label=f"{key} (AUC {r['roc']['auc']:.2f})")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_xlabel("false positive rate (steps finding nothing new)")
        ax.set_title(f"{regime}: {n_scenes * (2 if regime == 'pooled' else 1)} validation "
                     "scenes", fontsize=9)  # fmt: skip
        ax.legend(fontsize=7)
    axes[0].set_ylabel("true positive rate (steps finding a new object)")
    fig.suptitle("stop criterion: log-likelihood ratio against background > t", fontsize=10)
    atomic_write(args.figure, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight",
                                                      format="png"))  # fmt: skip
    plt.close(fig)
    atomic_write_json(args.out, out)
    if not args.smoke:
        threshold = best["fit"]["threshold"]
        atomic_write_json(args.package_file, {
            "threshold": threshold if math.isfinite(threshold) else -1e30,
            "explain_away": best["explain_away"],
            "background": best["background"],
            "model": "GenerativeModel.default()",
            "model_sha256": model_fingerprint(gm),
            "fitted_by": "benchmarks/parse_threshold.py",
            "split": out["seed"],
            "scenes": n_scenes,
            "criterion": f"max micro F1 of kept instances at mask IoU >= {IOU}",
            "regimes": "pooled: cluttered (2-3 airplanes, 0-3 distractors, clutter) and plain "
                       "(2-3 airplanes, no clutter) validation scenes",
            "validation": {k: round(v, 4) for k, v in best["fit"].items() if k != "threshold"},
            "roc_auc": round(best["roc"]["auc"], 4),
        })  # fmt: skip
        print(f"shipped {best_key} threshold {threshold:.2f} -> {args.package_file}")
    print(f"wrote {args.out} and {args.figure} ({out['seconds']} s)")
    return out


if __name__ == "__main__":
    main()
