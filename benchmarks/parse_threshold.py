"""The scene parser's stop criterion, fitted on validation scenes (never the test split).

Each validation scene (2-3 airplanes, 0-3 distractors of other known categories, clutter; and
2-3 airplanes on a plain background) is parsed with no stop (``threshold=-inf``) for a few more
steps than it has objects; every step is labelled "new object" when its instance matches a
not-yet-matched true instance at mask IoU >= 0.5 (the better of visible-vs-visible and
amodal-vs-amodal), else "nothing new". The sequence of steps does not depend on the stop
statistic (each step takes the best hypothesis by LLR), so every statistic and threshold is
scored on the prefixes of the same parses. For two backgrounds (``profile``: φ = 0 with each
element maximised as in eq. 13; ``off``: every element off) and two ways of explaining a found
object away (``subtract``, ``unobserve``), two statistics are compared:

- ``llr``: the step's log-likelihood ratio against the all-background explanation (the
  paper's statistic);
- ``fitted``: a logistic "new object" log-odds of the step's LLR, log visible pixels, visible
  fraction and step index (``--features`` may add the classifier's log-probability of the
  step's category on its visible region, recorded for every step;
  :func:`~pyro_backpass.parsing.fit_stop_criterion`, fitted on all the validation steps of both
  regimes), and the same fitted on one half of the scenes and scored
  on the other (``cross_validated``: 2 folds × 5 random splits by scene, mean), so that the
  in-sample numbers' optimism is visible.

Reported per setting and statistic: the ROC of "statistic > t" for "new object" (AUC), and the
threshold that maximises the micro F1 of the instances a parse keeps when it stops at the first
step at or below t. The setting with the best cross-validated F1 of the fitted statistic is
shipped in ``pyro_backpass/weights/parse_threshold.json`` (criterion, threshold and provenance)
as the parser's default.

With ``--verifier-top-k K`` the same validation scenes are parsed with the shipped descent
verifier (``run_parse(..., top_k=K, verifier=DescentVerifier.shipped())``, issue #10), in the
plain parse's shipped setting only; each step's heads are ordered by the plain parse's shipped
criterion (the refit criterion then orders them at parse time), and the statistic fitted on
these steps is shipped as ``pyro_backpass/weights/parse_threshold_verified.json`` with the
verifier's fingerprint: the default of a parse with that verifier. With ``--choose`` as well,
each step's heads are ordered by the shipped ``HeadChoice`` instead
(``run_parse(..., choose=HeadChoice.shipped())``; with ``--refine`` the instances' masks are
CRF-refined, ``refine_masks=True``, which changes what later steps see), and the statistic is
shipped as ``pyro_backpass/weights/parse_threshold_choice.json`` with the choice's and the
verifier's fingerprints and the ``refine_masks`` flag: the default of a parse with that choice.
``--heads-per-category M`` offers that choice each category's M best modes whose masks differ
(``HeadChoice.per_category``) instead of its own number, ``--refined-heads`` has it read every
head on its CRF-refined masks (``HeadChoice.refined_heads``; the heads' labels then judge those
masks too); the fingerprint recorded is that choice's.
Each step's stop features are the ones the parser read (``ParsedInstance.stop_inputs``: the
readout's mask before any CRF refinement; with ``--choose`` the parser also reads
``class_log_prob`` there, by a zero weight, so ``--steps-from ... --features ... class_log_prob``
refits on the parser's own values). Every step is also diagnosed (``step_diagnosis``: a new
object, one found again, a part, or clutter), counted in ``step_kinds``.

One thread per process (``--workers``). Writes ``benchmarks/results/parse_threshold.json`` and
``parse_threshold_roc.png`` (verified: ``parse_threshold_verified.json`` and
``parse_threshold_verified_roc.png``; with the choice: ``parse_threshold_choice[_crf].json``
and ``parse_threshold_choice[_crf]_roc.png``).

Usage: ``python benchmarks/parse_threshold.py [--scenes N] [--smoke] [--verifier-top-k K
[--choose [--refine [--refined-heads]] [--heads-per-category M]] --workers 2]``
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine  # noqa: E402

from pyro_backpass.parsing import (  # noqa: E402
    CHOICE_THRESHOLD_FILE,
    STOP_FEATURES,
    THRESHOLD_FILE,
    VERIFIED_THRESHOLD_FILE,
)

PACKAGE_FILE = Path(__file__).parents[1] / "pyro_backpass" / "weights" / THRESHOLD_FILE
VERIFIED_FILE = PACKAGE_FILE.with_name(VERIFIED_THRESHOLD_FILE)
CHOICE_FILE = PACKAGE_FILE.with_name(CHOICE_THRESHOLD_FILE)
BASE_FEATURES = tuple(f for f in STOP_FEATURES if f != "class_log_prob")
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


def take(inst, scene, free: list[int]) -> bool:
    """Does ``inst`` match one of the not-yet-matched true instances ``free`` at IoU >= 0.5
    (the better of visible and amodal)? The best such one is removed from ``free``."""
    best, which = 0.0, None
    for k in free:
        t = scene.instances[k]
        v = max(iou(inst.mask, t.mask), iou(inst.amodal_mask, t.amodal_mask))
        if v > best:
            best, which = v, k
    hit = which is not None and best >= IOU
    if hit:
        free.remove(which)
    return hit


def label_steps(parse, scene) -> list[bool]:
    """Per step: does its instance match a not-yet-matched true instance at IoU >= 0.5?"""
    free = list(range(len(scene.instances)))
    return [take(inst, scene, free) for inst in parse.instances]


def head_labels(parse, scene) -> list[list[dict]] | None:
    """Per step of a parse with a ``HeadChoice`` (``ParsedInstance.heads``), every head the step
    chose among: what the choice read, its score, ``best_iou`` with a true instance no earlier
    step matched (:func:`label_steps`' matching) and ``hit`` (that IoU >= 0.5: choosing it would
    have found a new object). None without heads."""
    if not parse.instances or parse.instances[0].heads is None:
        return None
    free = list(range(len(scene.instances)))
    out = []
    for inst in parse.instances:
        step = []
        for h in inst.heads:
            best = max((max(iou(h["mask"], scene.instances[k].mask),
                            iou(h["amodal_mask"], scene.instances[k].amodal_mask))
                        for k in free), default=0.0)  # fmt: skip
            step.append({**{k: v for k, v in h.items() if k not in ("mask", "amodal_mask")},
                         "best_iou": round(best, 4), "hit": best >= IOU})  # fmt: skip
        out.append(step)
        take(inst, scene, free)  # label_steps' matching of the instance taken
    return out


def step_diagnosis(parse, scene, labels: list[bool]) -> list[dict]:
    """Per step (``labels``: :func:`label_steps` of the parse), what it took: its best IoU with
    any true instance (the better of visible and amodal), whether that instance was found by an
    earlier step (``again``), whether its category is the step's, and ``kind``: "new" (IoU >=
    0.5 with an instance not found before), "again", "part" (0.1 <= IoU < 0.5) or "clutter"
    (IoU < 0.1)."""
    found: set[int] = set()
    out = []
    for inst, hit in zip(parse.instances, labels, strict=True):
        ious = [max(iou(inst.mask, t.mask), iou(inst.amodal_mask, t.amodal_mask))
                for t in scene.instances]  # fmt: skip
        k = max(range(len(ious)), key=ious.__getitem__) if ious else None
        best = ious[k] if k is not None else 0.0
        again = k is not None and best >= IOU and k in found and not hit
        if hit:  # the instance label_steps matched: the best unfound one at IoU >= 0.5
            k = max((j for j in range(len(ious)) if j not in found), key=ious.__getitem__)
            found.add(k)
        kind = "new" if hit else "again" if again else "part" if best >= 0.1 else "clutter"
        out.append({"best_iou": round(best, 4), "kind": kind,
                    "category_right": k is not None and best >= 0.1
                    and scene.instances[k].category == inst.category})  # fmt: skip
    return out


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
        "steps": [{"scores": [round(s, 4) for s in r[0]], "labels": r[1], "objects": r[2]}
                  for r in runs],
    }  # fmt: skip


def report(name: str, row: dict) -> None:
    fit = row["fit"]
    print(f"{name:36s} AUC {row['roc']['auc']:.3f}  t={fit['threshold']:.2f} "
          f"F1 {fit['f1']:.3f} P {fit['precision']:.3f} R {fit['recall']:.3f} "
          f"count acc {fit['count_accuracy']:.3f}", flush=True)  # fmt: skip


def scored(scenes: list[dict], crit) -> list[tuple[list[float], list[bool], int]]:
    """``runs`` of :func:`fit_threshold` with each step scored by ``crit``."""
    return [([crit.statistic(**f) for f in s["features"]], s["labels"], s["objects"])
            for s in scenes]  # fmt: skip


def cross_validated(scenes: list[dict], *, features, splits: int = 5, seed: int = 0) -> dict:
    """The fitted statistic scored on scenes it was not fitted on: 2 folds by scene, ``splits``
    random splits; the threshold is fitted on the training half too. Means over the folds."""
    from pyro_backpass.parsing import fit_stop_criterion, stop_features

    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(splits):
        order = rng.permutation(len(scenes))
        for fold in range(2):
            test = [scenes[i] for i in order[fold::2]]
            train = [scenes[i] for i in order[1 - fold :: 2]]
            steps = [stop_features(**f) for s in train for f in s["features"]]
            labels = [y for s in train for y in s["labels"]]
            if all(labels) or not any(labels):
                continue
            crit = fit_stop_criterion(steps, labels, features=features)
            t = fit_threshold(scored(train, crit))["threshold"]
            runs = scored(test, crit)
            tp = kept = truth = exact = 0
            for scores, labs, n_true in runs:
                n = next((i for i, v in enumerate(scores) if v <= t), len(scores))
                tp, kept = tp + sum(labs[:n]), kept + n
                truth, exact = truth + n_true, exact + (n == n_true)
            prec, rec = tp / max(kept, 1), tp / max(truth, 1)
            flat = [(v, y) for r in runs for v, y in zip(r[0], r[1], strict=True)]
            rows.append({"auc": roc([v for v, _ in flat], [y for _, y in flat])["auc"],
                         "f1": 2 * prec * rec / max(prec + rec, 1e-12), "precision": prec,
                         "recall": rec, "count_accuracy": exact / max(len(runs), 1)})  # fmt: skip
    keys = ("auc", "f1", "precision", "recall", "count_accuracy")
    out = {}
    for k in keys:  # folds with one label have no AUC: the mean of the others
        vals = [r[k] for r in rows if not math.isnan(r[k])]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out


_MODEL: dict = {}


def parse_steps(job: tuple) -> dict:
    """One validation scene parsed with no stop for a few more steps than it has objects: each
    step's stop features and label. Plain: every step takes the best mode by LLR (the LLR is
    the ordering criterion). With ``verifier_top_k`` K: ``run_parse(..., top_k=K,
    verifier=DescentVerifier.shipped())``, whose heads are ordered by the plain parse's shipped
    criterion, or with ``choose`` by the shipped ``HeadChoice`` (``refine``: CRF-refined masks);
    one thread; the model is loaded once per process. The features are the ones the parser's
    stop statistic read (``ParsedInstance.stop_inputs``)."""
    from pyro_backpass import DescentVerifier, GenerativeModel, HeadChoice
    from pyro_backpass.parsing import StopCriterion, default_threshold, region_log_prob, run_parse

    scene, explain, background, smoke, verifier_top_k, choose, refine, choice_kw = job
    torch.set_num_threads(1)
    if not _MODEL:
        _MODEL["gm"] = GenerativeModel.default()
        _MODEL["verifier"] = DescentVerifier.shipped()
        _MODEL["choice"] = HeadChoice.shipped()
    gm = _MODEL["gm"]
    n_true = len(scene.instances)
    steps = 2 if smoke else min(n_true + 2, 6)
    if verifier_top_k is None:
        knobs = dict(criterion=StopCriterion.llr())
    else:
        criterion = default_threshold(gm)["criterion"]
        if choose:  # the choice orders the heads and nothing stops: a zero weight on
            # class_log_prob only makes the parser read it on the statistic's own region
            record = criterion.to_dict()
            record["weights"] = {**record["weights"], "class_log_prob": 0.0}
            criterion = StopCriterion.from_dict(record)
        knobs = dict(criterion=criterion, top_k=verifier_top_k,
                     verifier=_MODEL["verifier"], refine_masks=refine,
                     choose=(dataclasses.replace(_MODEL["choice"], **choice_kw)
                             if choose else None))  # fmt: skip
    with torch.no_grad():
        parse = run_parse(gm, scene.image, max_objects=steps, threshold=-math.inf,
                          explain=explain, background=background, **knobs)  # fmt: skip
    logp = [None] * len(parse.instances)
    if parse.instances:  # the scenes are model-sized: the image is the parse's one view
        masks = torch.stack([i.mask for i in parse.instances])
        index = [gm.backbone.categories.index(i.category) for i in parse.instances]
        logp = region_log_prob(gm.backbone, scene.image, masks, index).tolist()
    labels = label_steps(parse, scene)
    return {
        "features": [{"class_log_prob": lp, **i.stop_inputs}  # the parser's own, when read
                     for i, lp in zip(parse.instances, logp, strict=True)],
        "labels": labels, "objects": n_true,
        "diagnosis": step_diagnosis(parse, scene, labels),
        "heads": head_labels(parse, scene),  # with --choose: every step's heads (refit it)
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scenes", type=int, default=30, help="per regime")
    p.add_argument(
        "--smoke", action="store_true", help="1 scene a regime, 2 steps, nothing shipped"
    )
    p.add_argument("--out", type=Path, default=RESULTS / "parse_threshold.json")
    p.add_argument("--figure", type=Path, default=RESULTS / "parse_threshold_roc.png")
    p.add_argument("--package-file", type=Path, default=None,
                   help=f"default: {PACKAGE_FILE.name}, or {VERIFIED_FILE.name} with "
                        "--verifier-top-k")  # fmt: skip
    p.add_argument("--verifier-top-k", type=int, default=None, metavar="K",
                   help="fit the criterion on parses with the shipped descent verifier and K "
                        "modes a step (run_parse(..., top_k=K, verifier=...)), in the shipped "
                        "setting only")  # fmt: skip
    p.add_argument("--choose", action="store_true",
                   help="with --verifier-top-k: heads chosen by the shipped HeadChoice; the "
                        "criterion is shipped as parse_threshold_choice.json")  # fmt: skip
    p.add_argument(
        "--refine",
        action="store_true",
        help="with --choose: CRF-refined instance masks (refine_masks=True)",
    )
    p.add_argument("--heads-per-category", type=int, default=None, metavar="M",
                   help="with --choose: the choice is offered each category's M best modes "
                        "whose masks differ (HeadChoice.per_category)")  # fmt: skip
    p.add_argument("--refined-heads", action="store_true",
                   help="with --choose --refine: the choice reads every head on its CRF-refined "
                        "masks (HeadChoice.refined_heads)")  # fmt: skip
    p.add_argument("--workers", type=int, default=1, help="processes of one thread each")
    p.add_argument("--steps-from", type=Path, default=None, metavar="JSON",
                   help="refit on the steps a previous run of the same kind wrote (its "
                        "'parsed'), without parsing again")  # fmt: skip
    p.add_argument("--features", nargs="+", default=list(BASE_FEATURES), choices=STOP_FEATURES,
                   help="the features the fitted statistic weighs (default: all but "
                        "class_log_prob, which costs a classifier pass a step)")  # fmt: skip
    args = p.parse_args(argv)
    verified = args.verifier_top_k is not None
    if args.choose and not verified:
        p.error("--choose needs --verifier-top-k (the choice picks among verified heads)")
    if args.refine and not args.choose:
        p.error("--refine needs --choose")
    if args.heads_per_category is not None and (not args.choose or args.heads_per_category < 1):
        p.error("--heads-per-category needs --choose and M >= 1")
    if args.refined_heads and not args.refine:
        p.error("--refined-heads needs --choose --refine")
    choice_kw = {k: v for k, v in (("per_category", args.heads_per_category),
                                   ("refined_heads", args.refined_heads or None)) if v}  # fmt: skip
    if args.choose and not args.refine:  # no CRF masks to read: the choice reads the readout's
        choice_kw["refined_heads"] = False
    kind = ("choice" + ("_crf" if args.refine else "")) if args.choose else "verified"
    if args.package_file is None:
        args.package_file = (CHOICE_FILE if args.choose else VERIFIED_FILE if verified
                             else PACKAGE_FILE)  # fmt: skip
    if verified and args.out == RESULTS / "parse_threshold.json":
        args.out = RESULTS / f"parse_threshold_{kind}.json"
    if verified and args.figure == RESULTS / "parse_threshold_roc.png":
        args.figure = RESULTS / f"parse_threshold_{kind}_roc.png"
    torch.set_num_threads(1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyro_backpass import DescentVerifier, GenerativeModel, HeadChoice, make_scene
    from pyro_backpass.data import split_seed
    from pyro_backpass.files import atomic_write, atomic_write_json
    from pyro_backpass.inference import verifier_fingerprint
    from pyro_backpass.parsing import (
        StopCriterion,
        default_threshold,
        fit_stop_criterion,
        model_fingerprint,
        record_fingerprint,
        stop_features,
        threshold_record,
    )

    gm = GenerativeModel.default()
    n_scenes = 1 if args.smoke else args.scenes
    previous = None
    if args.steps_from is not None:
        import json

        previous = json.loads(args.steps_from.read_text())
        if (previous.get("verifier_top_k") != args.verifier_top_k
                or previous["smoke"] != args.smoke
                or previous.get("choose", False) != args.choose
                or previous.get("refine_masks", False) != args.refine):  # fmt: skip
            raise SystemExit(f"{args.steps_from} holds steps of another kind of run "
                             f"(verifier_top_k {previous.get('verifier_top_k')}, choose "
                             f"{previous.get('choose', False)}, refine_masks "
                             f"{previous.get('refine_masks', False)})")  # fmt: skip
        n_scenes = previous["scenes"]
    seed = split_seed("validation", SEED)
    rng = np.random.default_rng(seed)
    scenes = {
        regime: [make_scene(**scene_options(rng, regime), seed=(seed, r, i))
                 for i in range(n_scenes)]
        for r, regime in enumerate(REGIMES)
    }  # fmt: skip
    settings = [(e, b) for e in ("subtract", "unobserve") for b in ("profile", "off")]
    verifier = None
    if verified:  # the verified parse is fitted in the plain parse's shipped setting only
        verifier = DescentVerifier.shipped()
        if verifier is None:
            raise SystemExit("no shipped descent verifier: run benchmarks/fit_verifier.py --ship")
        plain = default_threshold(gm)
        if plain["fitted_on"] != "plain":
            raise SystemExit("fit the plain parse's criterion first (parse_threshold.py)")
        settings = [(plain["explain_away"], plain["background"])]
    choice = None
    if args.choose:
        choice = HeadChoice.shipped()
        if choice is None:
            raise SystemExit("no shipped HeadChoice: run benchmarks/fit_head_choice.py --ship")
        choice = dataclasses.replace(choice, **choice_kw)
    out: dict = {"machine": machine(), "smoke": args.smoke, "split": "validation",
                 "seed": f"split_seed('validation', {SEED}) = {seed}", "scenes": n_scenes,
                 "iou": IOU, "features": list(args.features), "settings": {},
                 "verifier_top_k": args.verifier_top_k, "workers": args.workers,
                 "steps_from": None if previous is None else str(args.steps_from),
                 "model_sha256": model_fingerprint(gm),
                 "backbone_sha256": verifier_fingerprint(gm),  # the model's and backbone's
                 "verifier_sha256": None if verifier is None else verifier.fingerprint(),
                 "choose": args.choose, "refine_masks": args.refine,
                 "heads_per_category": None if choice is None else choice.per_category,
                 "refined_heads": None if choice is None else choice.refined_heads,
                 "head_choice_sha256": None if choice is None else choice.fingerprint(),
                 "plain_record_sha256": (record_fingerprint(threshold_record()) if verified
                                         else None)}  # fmt: skip
    if previous is not None:  # its steps must be what this run would parse
        stale = [k for k in ("model_sha256", "backbone_sha256", "verifier_sha256",
                             "plain_record_sha256", "head_choice_sha256")
                 if previous.get(k) != out[k]]  # fmt: skip
        if stale:
            raise SystemExit(f"{args.steps_from} was parsed with another {stale}: parse again")
    start = time.perf_counter()
    crits = {}
    for explain, background in settings:
        key = f"{explain}/{background}"
        row: dict = {"explain_away": explain, "background": background, "regimes": {}}
        jobs = [(scene, explain, background, args.smoke, args.verifier_top_k, args.choose,
                 args.refine, choice_kw)
                for regime in REGIMES for scene in scenes[regime]]  # fmt: skip
        if previous is not None:
            done = previous["settings"][key]["parsed"]
        elif args.workers > 1:
            with ProcessPoolExecutor(args.workers) as pool:
                done = list(pool.map(parse_steps, jobs))
        else:
            done = [parse_steps(job) for job in jobs]
        parsed = {r: done[i * n_scenes : (i + 1) * n_scenes] for i, r in enumerate(REGIMES)}
        pooled = [s for regime in REGIMES for s in parsed[regime]]
        llr = StopCriterion.llr()
        labels = [y for s in pooled for y in s["labels"]]
        if all(labels) or not any(labels):  # smoke: one scene a regime may have one label
            crit = llr
        else:
            crit = fit_stop_criterion(
                [stop_features(**f) for s in pooled for f in s["features"]], labels,
                features=args.features,
            )  # fmt: skip
        crits[key] = crit
        for name, c in (("llr", llr), ("fitted", crit)):
            row[name] = {"regimes": {r: summarise(scored(parsed[r], c)) for r in REGIMES},
                         "pooled": summarise(scored(pooled, c))}  # fmt: skip
            for r in REGIMES:
                report(f"{key} {name} {r}", row[name]["regimes"][r])
            report(f"{key} {name} pooled", row[name]["pooled"])
        row["criterion"] = crit.to_dict()
        row["parsed"] = pooled  # every step's raw features and label: other fits offline
        kinds = [d for s in pooled for d in s.get("diagnosis", [])]
        if kinds:  # what the steps took (step_diagnosis), over all steps of the no-stop parses
            row["step_kinds"] = {k: sum(d["kind"] == k for d in kinds)
                                 for k in ("new", "again", "part", "clutter")}  # fmt: skip
            row["step_kinds"]["category_right"] = sum(d["category_right"] for d in kinds)
            print(f"{key} steps took: {row['step_kinds']}", flush=True)
        row["cross_validated"] = (
            cross_validated(pooled, features=args.features) if crit is not llr else None
        )
        print(f"{key} cross-validated: {row['cross_validated']}", flush=True)
        out["settings"][key] = row
    out["seconds"] = round(time.perf_counter() - start, 1)

    def cv_f1(key: str) -> float:
        cv = out["settings"][key]["cross_validated"]
        return -1.0 if cv is None else cv["f1"]

    # Shipped: the setting whose fitted statistic has the best cross-validated F1.
    best_key = max(out["settings"], key=cv_f1)
    best = out["settings"][best_key]
    out["chosen"] = best_key

    fig, axes = plt.subplots(1, len(REGIMES) + 1, figsize=(4 * (len(REGIMES) + 1), 4))
    for ax, regime in zip(axes, [*REGIMES, "pooled"], strict=True):
        for key, row in out["settings"].items():
            for name, style in (("llr", ":"), ("fitted", "-")):
                r = row[name]["pooled"] if regime == "pooled" else row[name]["regimes"][regime]
                ax.plot(r["roc"]["fpr"], r["roc"]["tpr"], style,
                        label=f"{key} {name} (AUC {r['roc']['auc']:.2f})")  # fmt: skip
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_xlabel("false positive rate (steps finding nothing new)")
        ax.set_title(f"{regime}: {n_scenes * (2 if regime == 'pooled' else 1)} validation "
                     "scenes", fontsize=9)  # fmt: skip
        ax.legend(fontsize=6)
    axes[0].set_ylabel("true positive rate (steps finding a new object)")
    fig.suptitle("stop statistic > t: the LLR against background (dotted) and the fitted "
                 "log-odds (solid, in-sample)", fontsize=10)  # fmt: skip
    atomic_write(args.figure, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight",
                                                      format="png"))  # fmt: skip
    plt.close(fig)
    atomic_write_json(args.out, out)
    if not args.smoke:
        fit = best["fitted"]["pooled"]["fit"]
        threshold = fit["threshold"]
        atomic_write_json(args.package_file, {
            "stop_criterion": crits[best_key].to_dict(),
            "threshold": threshold if math.isfinite(threshold) else -1e30,
            "explain_away": best["explain_away"],
            "background": best["background"],
            "model": "GenerativeModel.default()",
            "model_sha256": model_fingerprint(gm),
            "fitted_by": "benchmarks/parse_threshold.py"
                         + (f" --verifier-top-k {args.verifier_top_k}" if verified else "")
                         + (" --choose" if args.choose else "")
                         + (" --refine" if args.refine else "")
                         + (f" --heads-per-category {args.heads_per_category}"
                            if args.heads_per_category is not None else "")
                         + (" --refined-heads" if args.refined_heads else ""),
            **({"verifier_sha256": verifier.fingerprint(), "verifier_top_k": args.verifier_top_k,
                "ordered_by": "the plain parse's shipped criterion (parse_threshold.json)",
                "plain_record_sha256": record_fingerprint(threshold_record())}
               if verified else {}),
            **({"ordered_by": "the shipped HeadChoice (head_choice.json)"
                              + "".join(f", {k}={v}" for k, v in choice_kw.items()),
                "head_choice_sha256": choice.fingerprint(), "refine_masks": args.refine}
               if args.choose else {}),
            "split": out["seed"],
            "scenes": n_scenes,
            "criterion": f"max micro F1 of kept instances at mask IoU >= {IOU}",
            "regimes": "pooled: cluttered (2-3 airplanes, 0-3 distractors, clutter) and plain "
                       "(2-3 airplanes, no clutter) validation scenes",
            "validation": {k: round(v, 4) for k, v in fit.items() if k != "threshold"},
            "validation_cross_validated": {k: round(v, 4)
                                           for k, v in best["cross_validated"].items()},
            "roc_auc": round(best["fitted"]["pooled"]["roc"]["auc"], 4),
            "roc_auc_llr": round(best["llr"]["pooled"]["roc"]["auc"], 4),
        })  # fmt: skip
        print(f"shipped {best_key} threshold {threshold:.3f} -> {args.package_file}")
    print(f"wrote {args.out} and {args.figure} ({out['seconds']} s)")
    return out


if __name__ == "__main__":
    main()
