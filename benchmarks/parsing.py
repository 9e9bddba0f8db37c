"""Scene-parsing quality (issue #11): ``parse_scene`` against Captum's guided backprop,
deconvnet and guided Grad-CAM on the same backbone and held-out scenes.

Scenes: 2–3 airplanes, 0–3 distractors of the other known categories and background clutter,
occlusion at three levels (most occluded instance in [0, 0.2], [0.1, 0.4] or [0.3, 0.6]) in
turn. The *validation* split tunes every threshold (the baselines' smoothing, threshold and
smallest component; ours ships its own calibrated stop), the *test* split gives the numbers.
The true instances are every object of a category the model knows (targets and
distractors), never clutter. Metrics (``pyro_backpass.parsing.metrics``): instance recall and
precision at mask IoU ≥ 0.5 after Hungarian matching, mean matched IoU, COCO mask AP
(pycocotools, class-agnostic; ``mask_ap_category`` with categories), count accuracy,
foreground ARI, and for true instances occluded by ≥ 10 %: the amodal IoU of the matched
prediction's completed mask and the IoU on the occluded pixels alone (the baselines have no
completion, so their visible mask stands in).

Class sensitivity: scenes of one airplane and one object of another known category, each
queried in turn; the share of the map's positive mass inside the queried instance's visible
mask. Ours: the image-space reconstruction of the first backward pass with the category clamped
(``greedy_map(..., category=c).image``; ``class_sensitivity_mask`` uses that pass's mask
instead); baselines: ``|attribution|`` for that class target.

Ours is run twice: as a user calls it (``parse_scene(gm, image)``, the stop criterion shipped
for the model, or the parser's fallback when none is fitted for it), and
``ours_validation_threshold``: the stop threshold tuned on this benchmark's validation scenes
for the best F1 (:func:`tune_stop`).

Sanity check (Adebayo et al. 2018): ours again with every top-down kernel of the generative
model replaced by Gaussian noise of the same mean and standard deviation; the metrics must
collapse. Failures of ours (missed true instances, spurious predictions) are diagnosed with
the oracle ladder of ``diagnose.py`` (free pass with the category given / top level clamped
to the truth / the object alone) and drawn in ``parsing_failures.png``.

One thread. Writes ``benchmarks/results/parsing.json`` (one entry per method) and the figure;
``--table`` prints the README's table from the JSON; ``--smoke`` runs in seconds (2 + 2
scenes, the shipped model).

Usage: ``python benchmarks/parsing.py [--validation N] [--test N] [--model PATH] [--smoke]``
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from baselines import (  # noqa: E402
    METHODS,
    attribution_fn,
    category_maps,
    instances_from_maps,
    tune,
)
from common import RESULTS, hidden_bu, learned_model, machine  # noqa: E402
from diagnose import object_rungs  # noqa: E402

from pyro_backpass import (  # noqa: E402
    GenerativeModel,
    InstanceEvaluation,
    PredictedInstances,
    Scene,
    class_sensitivity,
    greedy_map,
    make_scene,
)
from pyro_backpass.data import split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402

OCCLUSION_LEVELS: tuple[tuple[float, float], ...] = ((0.0, 0.2), (0.1, 0.4), (0.3, 0.6))
# Seed tuples of this benchmark's scenes: (split seed, PURPOSE, index), so they differ from
# every other benchmark's (split seed, index).
PARSE, SENSITIVITY = 11, 12
MAX_OBJECTS = None  # as a user calls it: the parser stops by its criterion or its own MAX_STEPS
HIT = 0.5


# ------------------------------------------------------------------------------------ scenes


def parse_scenes(split: str, n: int) -> list[Scene]:
    """``n`` scenes of 2–3 airplanes, 0–3 distractors and clutter, occlusion levels in turn."""
    scenes = []
    for i in range(n):
        rng = np.random.default_rng([split_seed(split), PARSE, i])
        airplanes, distractors = int(rng.integers(2, 4)), int(rng.integers(0, 4))
        for attempt in range(20):  # a crowded scene may not fit an occlusion range: redraw
            try:
                scenes.append(make_scene(
                    targets=("airplane",) * airplanes, distractors=distractors,
                    occlusion=OCCLUSION_LEVELS[i % len(OCCLUSION_LEVELS)],
                    seed=(split_seed(split), PARSE, i, attempt),
                ))  # fmt: skip
                break
            except ValueError:
                continue
        else:
            raise RuntimeError(f"scene {i} of {split}: no placement in 20 attempts")
    return scenes


def sensitivity_scenes(split: str, n: int) -> list[Scene]:
    """One airplane and one object of another known category, clutter, little occlusion."""
    return [make_scene(targets=("airplane",), distractors=1, occlusion=(0.0, 0.2),
                       seed=(split_seed(split), SENSITIVITY, i)) for i in range(n)]  # fmt: skip


def truth_of(scene: Scene, categories: tuple[str, ...]) -> tuple[PredictedInstances, np.ndarray]:
    """The scene's instances of known categories (visible masks) and their amodal masks."""
    known = [inst for inst in scene.instances if inst.category in categories and inst.mask.any()]
    h, w = scene.image.shape[-2:]
    if not known:
        return PredictedInstances.empty((h, w)), np.zeros((0, h, w), dtype=bool)
    truth = PredictedInstances(
        np.stack([i.mask.numpy() for i in known]), np.ones(len(known)),
        tuple(i.category for i in known),
    )  # fmt: skip
    return truth, np.stack([i.amodal_mask.numpy() for i in known])


# -------------------------------------------------------------------------------------- ours


def as_numpy_mask(m: object) -> np.ndarray:
    return (m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else np.asarray(m)).astype(bool)


def parse_fn(
    gm: GenerativeModel, *, stop_of: GenerativeModel | None = None, cap: int | None = MAX_OBJECTS
) -> Callable:
    """``parse(image) -> SceneParse`` of ``gm`` by ``parse_scene``. With ``stop_of``, the stop
    criterion (statistic, threshold, explain-away, background) fitted for that model is used
    instead of ``gm``'s own (the sanity check keeps the shipped model's criterion)."""
    from pyro_backpass import parse_scene

    if stop_of is None:
        return lambda image: parse_scene(gm, image, max_objects=cap)
    from pyro_backpass.parsing import default_threshold, run_parse

    fit = default_threshold(stop_of)
    return lambda image: run_parse(
        gm, image, max_objects=cap, threshold=fit["threshold"], criterion=fit["criterion"],
        explain=fit["explain_away"], background=fit["background"],
    )  # fmt: skip


def default_threshold_of(gm: GenerativeModel) -> dict:
    """The stop criterion ``parse_scene`` uses for ``gm`` (``StopCriterion`` object included)."""
    from pyro_backpass.parsing import default_threshold

    return default_threshold(gm)


def stop_criterion(gm: GenerativeModel) -> dict:
    """The stop criterion ``parse_scene`` uses for ``gm``, and whether it is a fit shipped for
    this model (else the parser's unfitted fallback)."""
    from pyro_backpass.parsing import default_threshold, model_fingerprint, threshold_record

    record = threshold_record()
    fitted = record is not None and record.get("model_sha256") == model_fingerprint(gm)
    fit = default_threshold(gm)
    return {**fit, "criterion": fit["criterion"].to_dict(), "fitted_for_this_model": fitted}


def predicted(insts: list, shape: tuple[int, int]) -> tuple[PredictedInstances, np.ndarray]:
    """A parse's instances as :class:`PredictedInstances` and their amodal masks."""
    if not insts:
        return PredictedInstances.empty(shape), np.zeros((0, *shape), dtype=bool)
    pred = PredictedInstances(
        np.stack([as_numpy_mask(i.mask) for i in insts]),
        np.array([float(i.score) for i in insts]), tuple(i.category for i in insts),
    )  # fmt: skip
    amodal = np.stack([as_numpy_mask(i.mask if i.amodal_mask is None else i.amodal_mask)
                       for i in insts])  # fmt: skip
    return pred, amodal


def tune_stop(
    gm: GenerativeModel, validation: list[Scene], *, max_steps: int | None = None
) -> tuple[float, float]:
    """The stop threshold (on the stop statistic ``parse_scene`` uses for ``gm``) with the best
    validation F1 at IoU ≥ 0.5, for ``gm`` with the shipped explain-away and background, and
    that F1.

    Each validation scene is parsed once without a stop (``threshold=-inf``) up to
    ``max_steps`` (default ``MAX_STEPS``) instances. With one parse path and no query, a
    threshold ``t`` only ends that sequence at the first instance whose score is ≤ t (each
    step takes the best hypothesis whatever ``t`` is), so every candidate ``t`` is scored on
    the prefixes."""
    from pyro_backpass import run_parse
    from pyro_backpass.parsing import MAX_STEPS, default_threshold

    fit = default_threshold(gm)
    runs = []
    for scene in validation:
        p = run_parse(gm, scene.image, threshold=-math.inf, max_objects=max_steps or MAX_STEPS,
                      criterion=fit["criterion"], explain=fit["explain_away"],
                      background=fit["background"])  # fmt: skip
        runs.append((list(p.instances), truth_of(scene, gm.categories)[0]))
    scores = sorted({float(i.score) for insts, _ in runs for i in insts})
    best = (-1.0, -math.inf)
    for t in [-math.inf, *scores]:
        ev = InstanceEvaluation(gm.categories)
        for insts, truth in runs:
            keep = []
            for i in insts:
                if float(i.score) <= t:
                    break
                keep.append(i)
            ev.add(predicted(keep, truth.masks.shape[1:])[0], truth)
        r = ev.hits / ev.n_true if ev.n_true else 0.0
        p_ = ev.hits / ev.n_pred if ev.n_pred else 0.0
        f1 = 2 * r * p_ / (r + p_) if r + p_ > 0 else 0.0
        if f1 > best[0]:
            best = (f1, t)
    return best[1], best[0]


_FORKED: dict = {}  # what forked workers of run_ours read: the parse function and the scenes


def _timed_parse(k: int) -> tuple[object, float]:
    torch.set_num_threads(1)
    t = time.perf_counter()
    with torch.no_grad():
        out = _FORKED["parse"](_FORKED["scenes"][k].image)
    return out, time.perf_counter() - t


def run_ours(
    gm: GenerativeModel, scenes: list[Scene], parse: Callable, *, workers: int = 1
) -> tuple[InstanceEvaluation, list[dict]]:
    """Parse every scene; the evaluation and per-scene records (for the failure analysis).
    ``workers`` > 1: the scenes are parsed by that many forked processes of one thread each
    (the parse function is inherited, not pickled); the evaluation is the same."""
    ev = InstanceEvaluation(gm.categories)
    records = []
    _FORKED.update(parse=parse, scenes=scenes)
    try:
        if workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
                done = list(tqdm(pool.map(_timed_parse, range(len(scenes))), total=len(scenes),
                                 desc="parses", leave=False))  # fmt: skip
        else:
            done = [_timed_parse(k) for k in tqdm(range(len(scenes)), desc="parses", leave=False)]
    finally:
        _FORKED.clear()
    for k, (scene, (parse_result, seconds)) in enumerate(zip(scenes, done, strict=True)):
        pred, amodal = predicted(list(parse_result.instances), tuple(scene.image.shape[-2:]))
        truth, true_amodal = truth_of(scene, gm.categories)
        m = ev.add(pred, truth, pred_amodal=amodal, true_amodal=true_amodal)
        records.append({"scene": k, "seconds": seconds, "pred": pred, "truth": truth,
                        "matching": m, "stop_reason": str(parse_result.stop_reason)})  # fmt: skip
    return ev, records


def randomised_kernels(gm: GenerativeModel, *, seed: int = 0) -> GenerativeModel:
    """A copy of ``gm`` whose top-down kernels (every step's ``weight``) are Gaussian noise of
    the same mean and standard deviation per level; biases, priors and the observation model
    are kept. Adebayo et al.'s model-randomisation test applied to the generative model."""
    out = copy.deepcopy(gm)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for step in out.steps.values():
            w = step.weight
            noise = torch.randn(w.shape, generator=g, dtype=w.dtype)
            w.copy_(noise.to(w.device) * w.std() + w.mean())
    return out


# --------------------------------------------------------------------------------- baselines


def run_baseline(
    fn: Callable[[torch.Tensor, int], np.ndarray],
    gm: GenerativeModel,
    validation: list[Scene],
    test: list[Scene],
    *,
    grid: tuple | None = None,
) -> dict:
    """Tune a saliency method ``fn`` on validation, evaluate on test; its entry."""
    cats = gm.categories
    start = time.perf_counter()
    val_maps = [category_maps(fn, s.image, len(cats)) for s in validation]
    truths = [truth_of(s, cats)[0] for s in validation]
    setting, val_f1 = tune(val_maps, truths, cats, **({} if grid is None else {"grid": grid}))
    test_maps = [category_maps(fn, s.image, len(cats)) for s in test]
    ev = InstanceEvaluation(cats)
    for s, maps in zip(test, test_maps, strict=True):
        truth, true_amodal = truth_of(s, cats)
        ev.add(instances_from_maps(maps, cats, setting), truth, true_amodal=true_amodal)
    entry = ev.summary()
    entry["setting"] = {"sigma": setting.sigma, "threshold": setting.threshold,
                        "min_area": setting.min_area, "validation_f1": val_f1}  # fmt: skip
    entry["seconds"] = round(time.perf_counter() - start, 1)
    return entry


def sensitivity(maps_of: dict[str, object], scenes: list[Scene], cats: tuple[str, ...]) -> dict:
    """Mean class sensitivity per method; ``maps_of[method](image, category_index)``."""
    out: dict[str, list[float]] = {name: [] for name in maps_of}
    for scene in scenes:
        for inst in scene.instances:
            if inst.category not in cats or not inst.mask.any():
                continue
            for name, fn in maps_of.items():
                out[name].append(class_sensitivity(fn(scene.image, cats.index(inst.category)),
                                                   inst.mask))  # fmt: skip
    return {name: (float(np.mean(v)) if v else None) for name, v in out.items()}


def ours_maps(gm: GenerativeModel) -> dict[str, object]:
    def run(image: torch.Tensor, c: int):
        return greedy_map(gm, hidden_bu(gm, image), category=torch.tensor([c]))

    return {
        "reconstruction": lambda image, c: run(image, c).image[0],  # (3, H, W)
        "mask": lambda image, c: run(image, c).mask[0].float(),  # (H, W)
    }


# ---------------------------------------------------------------------------------- failures


def diagnose(gm: GenerativeModel, scene: Scene, record: dict) -> dict:
    """Why ours failed on a scene: each missed true instance's oracle ladder, each spurious
    prediction's likely source."""
    truth, pred, m = record["truth"], record["pred"], record["matching"]
    known = [i for i in scene.instances if i.category in gm.categories and i.mask.any()]
    hit_true = {t for p, t in m.pairs if m.ious[p, t] >= HIT}
    hit_pred = {p for p, t in m.pairs if m.ious[p, t] >= HIT}
    bu = hidden_bu(gm, scene.image)
    missed = []
    for t, inst in enumerate(known):
        if t in hit_true:
            continue
        rungs = object_rungs(gm, bu, inst)
        if rungs["alone_plain"] < HIT:
            why = "alone_fails"
        elif rungs["top_clamped"] < HIT:
            why = "lower_levels"
        elif rungs["free"] < HIT:
            why = "top_level"
        else:
            why = "parse"
        best = float(m.ious[:, t].max()) if len(pred.masks) else 0.0
        rungs = {k: round(v, 3) for k, v in rungs.items()}
        missed.append({"category": inst.category, "occlusion": round(inst.occlusion, 3),
                       "best_iou": round(best, 3), "rungs": rungs, "diagnosis": why})  # fmt: skip
    spurious = []
    clutter = scene.clutter_mask.numpy()
    for p in range(len(pred.masks)):
        if p in hit_pred:
            continue
        mask = pred.masks[p]
        area = max(int(mask.sum()), 1)
        overlap = float(m.ious[p].max()) if len(truth.masks) else 0.0
        if (mask & clutter).sum() / area >= 0.5:
            why = "clutter"
        elif overlap >= 0.2:
            why = "partial"
        else:
            why = "merged"
        spurious.append({"category": pred.categories[p], "best_iou": round(overlap, 3),
                         "diagnosis": why})  # fmt: skip
    return {"scene": record["scene"], "true": len(truth.masks), "predicted": len(pred.masks),
            "missed": missed, "spurious": spurious,
            "stop_reason": record["stop_reason"]}  # fmt: skip


#: The diagnoses of failures, by the oracle ladder (missed objects) or by what the spurious
#: instance covers.
DIAGNOSES: dict[str, str] = {
    "alone_fails": "missed: the pass fails on the object alone on the plain background (d)",
    "lower_levels": "missed: the pass fails with the top level clamped to the truth (b), "
    "alone it works: the lower levels let clutter and neighbours in",
    "top_level": "missed: the free pass (a) fails, clamping the top level to the truth (b) "
    "fixes it: the top-level decision is wrong",
    "parse": "missed: one category-given pass on the scene finds it (a): the parse's order, "
    "explaining-away or stop lost it",
    "clutter": "spurious: at least half of it on clutter",
    "partial": "spurious: a partial or second explanation of a true object (IoU ≥ 0.2)",
    "merged": "spurious: background, or several objects merged",
}


def label_image(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(H, W, 4)`` RGBA: instance i in colour i (the first claim wins), clear elsewhere."""
    out = np.zeros((*shape, 4))
    colours = plt.get_cmap("tab10")
    for i in range(len(masks) - 1, -1, -1):
        out[masks[i]] = colours(i % 10)
    return out


def failure_figure(scenes: list[Scene], records: list[dict], diagnoses: list[dict], path: Path):
    # Up to six scenes, first those that show a kind of failure not shown yet.
    rows, seen = [], set()
    for d in diagnoses:
        codes = {x["diagnosis"] for x in d["missed"] + d["spurious"]}
        if codes - seen:
            rows.append(d)
            seen |= codes
    rows += [d for d in diagnoses if d not in rows][: max(0, 6 - len(rows))]
    rows = rows[:6]
    fig, axes = plt.subplots(len(rows), 4, figsize=(9.0, 2.3 * len(rows)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1, 1.3]})  # fmt: skip
    for r, d in enumerate(rows):
        scene, rec = scenes[d["scene"]], records[d["scene"]]
        image = scene.image.permute(1, 2, 0).numpy()
        shape = image.shape[:2]
        axes[r, 0].imshow(image)
        axes[r, 0].set_title(f"test scene {d['scene']}", fontsize=8)
        axes[r, 1].imshow(image * 0.4 + 0.6)
        axes[r, 1].imshow(label_image(rec["truth"].masks, shape))
        axes[r, 1].set_title(f"truth: {d['true']} instances", fontsize=8)
        axes[r, 2].imshow(image * 0.4 + 0.6)
        axes[r, 2].imshow(label_image(rec["pred"].masks, shape))
        axes[r, 2].set_title(f"ours: {d['predicted']} instances", fontsize=8)
        lines = [
            f"missed {x['category']}: {x['diagnosis']}\n  IoU a/b/d "
            + "/".join(f"{x['rungs'][k]:.2f}" for k in ("free", "top_clamped", "alone_plain"))
            for x in d["missed"][:3]
        ]
        lines += [f"spurious {x['category']}: {x['diagnosis']}" for x in d["spurious"][:3]]
        axes[r, 3].text(0.0, 0.5, "\n".join(lines), fontsize=7, va="center", family="monospace")
        for ax in axes[r]:
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


# ------------------------------------------------------------------------------------- table

ROWS: tuple[tuple[str, str, str], ...] = (
    ("recall_iou50", "instance recall @ IoU ≥ 0.5", "≥ 0.90"),
    ("precision_iou50", "instance precision @ IoU ≥ 0.5", "≥ 0.90"),
    ("mean_matched_iou", "mean matched IoU", "ahead"),
    ("mask_ap", "COCO mask AP (class-agnostic)", "ahead"),
    ("mask_ap50", "COCO mask AP50", "ahead"),
    ("mask_ap_category", "COCO mask AP (with categories)", "ahead"),
    ("count_accuracy", "count accuracy", "≥ 0.90"),
    ("foreground_ari", "foreground ARI", "ahead"),
    ("class_sensitivity", "class sensitivity", "≥ 0.90"),
    ("class_sensitivity_mask", "class sensitivity, the pass's mask as the map", "—"),
    ("amodal_iou", "amodal IoU (occluded ≥ 10 %)", "ahead"),
    ("occluded_iou", "IoU on the occluded pixels", "ahead"),
)
COLUMNS = ("ours", "ours_validation_threshold", "ours_randomised_kernels", *METHODS)


def table(result: dict) -> str:
    def cell(entry: dict | None, key: str) -> str:
        v = None if entry is None else entry.get(key)
        if v is None:
            return "not run" if entry is None or entry.get("not_run") else "—"
        return f"{v:.3f}"

    beams = sorted(k for k in result if k.startswith(("ours_beam", "ours_verified")))  # added rows
    columns = (COLUMNS[0], *beams, *COLUMNS[1:])
    entries = {c: result.get(c) for c in columns}
    entries["ours_randomised_kernels"] = result.get("sanity_check", {}).get("ours_randomised")
    head = "| metric (JSON key) | " + " | ".join(columns) + " | target |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for key, name, target in ROWS:
        cells = " | ".join(cell(entries[c], key) for c in columns)
        lines.append(f"| {name} (`{key}`) | {cells} | {target} |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- main


def add_verified_sensitivity(out: Path, *, top_k: int, n_sens: int, model: Path | None) -> dict:
    """Class sensitivity of the verified pass, added to the row ``ours_verified<top_k>``: the
    first pass with the category clamped made by ``verified_map(..., top_k=top_k)`` with the
    shipped verifier (its reconstruction, and its mask), on the same scenes as the others'."""
    import json

    from pyro_backpass import DescentVerifier, verified_map

    torch.set_num_threads(1)
    gm, _ = learned_model(smoke=False, path=model)
    verifier = DescentVerifier.shipped()
    if verifier is None:
        raise SystemExit("no shipped descent verifier: run benchmarks/fit_verifier.py --ship")
    cache: dict = {}

    def run(image: torch.Tensor, c: int):
        key = (id(image), c)
        if key not in cache:
            cache[key] = verified_map(gm, hidden_bu(gm, image), category=torch.tensor([c]),
                                      verifier=verifier, top_k=top_k)  # fmt: skip
        return cache[key]

    with torch.no_grad():
        sens = sensitivity({"ours": lambda image, c: run(image, c).image[0],
                            "ours_mask": lambda image, c: run(image, c).mask[0].float()},
                           sensitivity_scenes("test", n_sens), gm.categories)  # fmt: skip
    result = json.loads(out.read_text())
    name = f"ours_verified{top_k}"
    if name not in result:
        raise SystemExit(f"{out} has no row {name}: add it first with --verified-row {top_k}")
    result[name]["class_sensitivity"] = sens["ours"]
    result[name]["class_sensitivity_mask"] = sens["ours_mask"]
    atomic_write_json(out, result)
    print(name, sens)
    return sens


def add_row(out: Path, *, n_test: int, model: Path | None, beam: int = 1,
            verified_top_k: int | None = None, plain_criterion: bool = False,
            split: str = "test", verifier_file: Path | None = None,
            name: str | None = None, refine: bool = False,
            airplane_refined: bool = False, choose: bool = False,
            workers: int = 1) -> dict:  # fmt: skip
    """``ours_beam<B>``: ``parse_scene(gm, image, beam=B)`` on the same test scenes, the stop
    criterion as shipped; or ``ours_verified<K>``: ``run_parse(gm, image, top_k=K,
    verifier=DescentVerifier.shipped())``, each step's K modes ranked by the shipped verifier
    (issue #10), stopped by its default criterion (with ``plain_criterion``: the plain parse's,
    row ``ours_verified<K>_plain_criterion``). Added to an existing results file.

    ``split`` "validation" parses as many of that split's parse scenes instead (used to compare
    verifiers without the test scenes; ``out`` is then made if missing); ``verifier_file``: that
    verifier instead of the shipped one (its criterion is the plain parse's unless a shipped
    record names its fingerprint); ``name``: the row's key; ``refine``: every instance's masks
    refined by the colour CRF (``run_parse(..., refine_masks=True)``; the row's key gains
    ``_crf``); ``airplane_refined``: airplanes' modes chosen by #10's best first stage,
    ``DescentVerifier.shipped(refined=True)`` (CRF-refined masks, consensus), the other
    categories' by the verifier as above (``run_parse(..., verifier={category: verifier})``;
    the key gains ``_airplane_refined``), stopped by the criterion the verifier above would
    use (the one fitted on the shipped verifier's parses, or with ``plain_criterion`` the plain
    parse's); ``choose``: each step's head chosen by the shipped ``HeadChoice``
    (``run_parse(..., choose=HeadChoice.shipped())``; the key gains ``_choice``), stopped by
    the criterion fitted on such parses when one is shipped for them
    (``default_threshold(..., choose=, refine_masks=)``, ``parse_threshold.py --choose``; the
    key then gains ``_refit``). ``workers``: processes of one thread each."""
    import json

    from pyro_backpass import DescentVerifier
    from pyro_backpass.parsing import run_parse

    if not out.is_file() and split == "test":
        raise SystemExit(f"{out}: run the benchmark first; a row is added to its results")
    torch.set_num_threads(1)
    gm, _ = learned_model(smoke=False, path=model)
    test = parse_scenes(split, n_test)
    if verified_top_k is None:
        name = name or f"ours_beam{beam}" + ("_crf" if refine else "")

        def parse(image):
            return run_parse(gm, image, beam=beam, refine_masks=refine)
    else:
        from pyro_backpass.parsing import default_threshold

        verifier = (DescentVerifier.shipped() if verifier_file is None
                    else DescentVerifier.load(verifier_file))  # fmt: skip
        if verifier is None:
            raise SystemExit("no shipped descent verifier: run benchmarks/fit_verifier.py --ship")
        head_choice = None
        if choose:
            from pyro_backpass import HeadChoice

            head_choice = HeadChoice.shipped()
            if head_choice is None:
                raise SystemExit("no shipped HeadChoice: run benchmarks/fit_head_choice.py --ship")
            if head_choice.refined_heads and not refine:  # no CRF masks to read: its readout's
                head_choice = dataclasses.replace(head_choice, refined_heads=False)
        stop = default_threshold(gm) if plain_criterion else default_threshold(
            gm, verifier=verifier, top_k=verified_top_k, choose=head_choice,
            refine_masks=refine)  # fmt: skip
        name = name or (f"ours_verified{verified_top_k}"
                        + ("_plain_criterion" if plain_criterion else "")
                        + ("_crf" if refine else "")
                        + ("_airplane_refined" if airplane_refined else "")
                        + ("_choice" if choose else "")
                        + ("_refit" if stop["fitted_on"] == "choice" else ""))  # fmt: skip
        chooser = verifier
        if airplane_refined:
            chooser = {**dict.fromkeys(gm.categories, verifier),
                       "airplane": DescentVerifier.shipped(refined=True)}  # fmt: skip

        def parse(image):
            return run_parse(gm, image, beam=beam, top_k=verified_top_k, verifier=chooser,
                             criterion=stop["criterion"], threshold=stop["threshold"],
                             refine_masks=refine, choose=head_choice)  # fmt: skip

    t = time.perf_counter()
    with torch.no_grad():
        ev, records = run_ours(gm, test, parse, workers=workers)
    row = ev.summary()
    row["beam"] = beam
    row["verifier_top_k"] = verified_top_k
    if verified_top_k is not None:  # which stop criterion the parse used (default_threshold)
        row["stop_criterion_fitted_on"] = stop["fitted_on"]
    row["seconds"] = round(time.perf_counter() - t, 1)
    row["median_seconds_per_parse"] = statistics.median(r["seconds"] for r in records)
    row["split"], row["scenes"], row["workers"] = split, n_test, workers
    if verified_top_k is not None:
        row["verifier_sha256"] = verifier.fingerprint()
        if airplane_refined:
            row["airplane_verifier_sha256"] = chooser["airplane"].fingerprint()
        if choose:
            row["head_choice"] = head_choice.to_dict()
    # read now: another row may have been added meanwhile
    result = json.loads(out.read_text()) if out.is_file() else {}
    result[name] = row
    atomic_write_json(out, result)
    print(name, {k: row[k] for k in ("recall_iou50", "precision_iou50", "count_accuracy",
                                     "seconds")})  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--validation", type=int, default=30, help="validation scenes")
    parser.add_argument("--test", type=int, default=50, help="test scenes")
    parser.add_argument("--sensitivity", type=int, default=30, help="class-sensitivity scenes")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the table of --out")
    parser.add_argument("--out", type=Path, default=RESULTS / "parsing.json")
    parser.add_argument("--beam-row", type=int, default=None, metavar="B",
                        help="only add the row of parse_scene(..., beam=B) on the test scenes "
                             "to --out (which must exist)")  # fmt: skip
    parser.add_argument("--verified-row", type=int, default=None, metavar="K",
                        help="only add the row of run_parse(..., top_k=K, verifier=the shipped "
                             "DescentVerifier) on the test scenes to --out")  # fmt: skip
    parser.add_argument(
        "--plain-criterion",
        action="store_true",
        help="with --verified-row: stop by the plain parse's criterion",
    )
    parser.add_argument(
        "--row-split",
        choices=("test", "validation"),
        default="test",
        help="with --beam-row/--verified-row: parse --test scenes of this split",
    )
    parser.add_argument(
        "--verifier",
        type=Path,
        default=None,
        metavar="FILE",
        help="with --verified-row: this DescentVerifier file, not the shipped",
    )
    parser.add_argument("--row-name", default=None, help="the added row's key")
    parser.add_argument("--refine", action="store_true",
                        help="with --beam-row/--verified-row: CRF-refined masks")  # fmt: skip
    parser.add_argument("--airplane-refined", action="store_true",
                        help="with --verified-row: airplanes' modes chosen by "
                             "DescentVerifier.shipped(refined=True)")  # fmt: skip
    parser.add_argument("--choose", action="store_true",
                        help="with --verified-row: each step's head chosen by "
                             "HeadChoice.shipped()")  # fmt: skip
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="with --beam-row/--verified-row: processes of one thread each",
    )
    parser.add_argument("--verified-sensitivity", type=int, default=None, metavar="K",
                        help="only add the class sensitivity of verified_map(..., top_k=K) to "
                             "the row ours_verified<K> of --out")  # fmt: skip
    args = parser.parse_args()
    if args.verified_sensitivity is not None:
        add_verified_sensitivity(args.out, top_k=args.verified_sensitivity, model=args.model,
                                 n_sens=1 if args.smoke else args.sensitivity)  # fmt: skip
        return
    if args.table:
        import json

        print(table(json.loads(args.out.read_text())))
        return
    if args.beam_row is not None or args.verified_row is not None:
        add_row(args.out, beam=args.beam_row or 1, verified_top_k=args.verified_row,
                plain_criterion=args.plain_criterion,
                n_test=2 if args.smoke else args.test, model=args.model,
                split=args.row_split, verifier_file=args.verifier,
                name=args.row_name, refine=args.refine,
                airplane_refined=args.airplane_refined, choose=args.choose,
                workers=args.workers)  # fmt: skip
        return
    torch.set_num_threads(1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # The shipped model loads in a second; training the smoke preset's would take 15 s.
    gm, model_name = learned_model(smoke=False, path=args.model)
    n_val, n_test, n_sens = (2, 2, 1) if args.smoke else (args.validation, args.test,
                                                         args.sensitivity)  # fmt: skip
    validation, test = parse_scenes("validation", n_val), parse_scenes("test", n_test)
    sens = sensitivity_scenes("test", n_sens)
    cats = gm.categories
    result: dict = {
        "machine": machine(), "threads": 1, "model": model_name,
        "scenes": {"validation": n_val, "test": n_test, "class_sensitivity": n_sens,
                   "occlusion_levels": [list(o) for o in OCCLUSION_LEVELS]},
    }  # fmt: skip

    maps_of: dict[str, object] = {}
    for method in METHODS:
        maps_of[method] = fn = attribution_fn(method, gm.backbone)
        grid = ((2.0,), (0.2, 0.4), (0, 64)) if args.smoke else None  # smoke: a tiny grid
        result[method] = entry = run_baseline(fn, gm, validation, test, grid=grid)
        print(method, {k: entry[k] for k in ("recall_iou50", "precision_iou50", "mask_ap")})

    cap = 2 if args.smoke else MAX_OBJECTS  # smoke: at most two instances per parse
    with torch.no_grad():
        ours_fns = ours_maps(gm)
        random_gm = randomised_kernels(gm)
        random_fns = ours_maps(random_gm)
        sens_result = sensitivity(
            {**maps_of, "ours": ours_fns["reconstruction"], "ours_mask": ours_fns["mask"],
             "random": random_fns["reconstruction"], "random_mask": random_fns["mask"]},
            sens, cats,
        )  # fmt: skip
    for method in METHODS:
        result[method]["class_sensitivity"] = sens_result[method]

    try:
        from pyro_backpass import parse_scene, run_parse  # noqa: F401
    except ImportError:
        available = False
    else:
        available = True
    if not available:
        reason = "parse_scene is not in this checkout of pyro_backpass (not merged yet)"
        result["ours"] = {"not_run": reason, "class_sensitivity": sens_result["ours"],
                          "class_sensitivity_mask": sens_result["ours_mask"]}  # fmt: skip
        result["sanity_check"] = {"ours_randomised": {
            "not_run": reason, "class_sensitivity": sens_result["random"],
            "class_sensitivity_mask": sens_result["random_mask"]}}  # fmt: skip
        result["failures"] = []
        print("ours: not run:", reason)
    else:
        with torch.no_grad():
            t = time.perf_counter()
            ev, records = run_ours(gm, test, parse_fn(gm, cap=cap))
            ours = ev.summary()
            ours["seconds"] = round(time.perf_counter() - t, 1)
            ours["median_seconds_per_parse"] = statistics.median(r["seconds"] for r in records)
            ours["stop_reasons"] = sorted({r["stop_reason"] for r in records})
            ours["class_sensitivity"] = sens_result["ours"]
            ours["class_sensitivity_mask"] = sens_result["ours_mask"]
            ours["stop_criterion"] = stop_criterion(gm)
            result["ours"] = ours
            t = time.perf_counter()
            threshold, val_f1 = tune_stop(gm, validation, max_steps=cap)
            fit = default_threshold_of(gm)
            ev_t, _ = run_ours(gm, test, lambda image: run_parse(
                gm, image, max_objects=cap, threshold=threshold, criterion=fit["criterion"],
                explain=fit["explain_away"], background=fit["background"]))  # fmt: skip
            tuned = ev_t.summary()
            tuned["seconds"] = round(time.perf_counter() - t, 1)
            tuned["stop_threshold"] = threshold
            tuned["validation_f1"] = val_f1
            result["ours_validation_threshold"] = tuned
            t = time.perf_counter()
            ev_r, _ = run_ours(random_gm, test, parse_fn(random_gm, stop_of=gm, cap=cap))
            rand = ev_r.summary()
            rand["seconds"] = round(time.perf_counter() - t, 1)
            rand["class_sensitivity"] = sens_result["random"]
            rand["class_sensitivity_mask"] = sens_result["random_mask"]
            result["sanity_check"] = {
                "ours_randomised": rand,
                "what": "every top-down kernel replaced by Gaussian noise of its level's "
                "mean and std (seed 0); biases, priors and observation model kept",
            }
            failed = [
                r for r in records
                if r["matching"].hits(HIT) < max(len(r["truth"].masks), len(r["pred"].masks))
            ]  # fmt: skip
            diagnoses = [diagnose(gm, test[r["scene"]], r) for r in failed]
        result["failures"] = diagnoses
        counts: dict[str, int] = {}
        for d in diagnoses:
            for x in d["missed"] + d["spurious"]:
                counts[x["diagnosis"]] = counts.get(x["diagnosis"], 0) + 1
        result["failure_counts"] = counts
        result["diagnosis_codes"] = DIAGNOSES
        if diagnoses:
            failure_figure(test, records, diagnoses, args.out.with_name("parsing_failures.png"))
        print("ours", {k: ours[k] for k in ("recall_iou50", "precision_iou50", "mask_ap")})
    result["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(args.out, result)
    print(table(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
