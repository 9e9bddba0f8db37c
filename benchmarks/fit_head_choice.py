"""Issue #11: fit the parse's choice among category heads (``HeadChoice``) on validation scenes.

``parse_first_step.py`` measured that the verified parse's stop statistic, which also chooses
among each step's per-category heads, ranks those heads at chance, while some head hits a true
instance in nearly every scene. This script collects what the parser sees at its first step:
on validation parse scenes (``parsing.py``'s ``parse_scenes``), for every category ``c``, one
step of ``run_parse(image, top_k=100, max_objects=1, threshold=-inf,
verifier=DescentVerifier.shipped(), query=Query(category=c))`` (that category's head, its
masks as the parser computes them, no CRF), with its log-likelihood ratio, visible and amodal
pixels, the backbone's log-probabilities of every category on its visible region
(``region_log_prob``) and whether its visible mask matches a true instance of a known category
at IoU ≥ 0.5. ``fit_head_choice`` then fits a conditional logit over each scene's heads (the
L2 weight by leave-one-scene-out hit rate) and ``--ship`` writes it to
``pyro_backpass/weights/head_choice.json`` with the fingerprints of the model and verifier.

One thread a process; ``--first``/``--scenes`` split the scenes between processes and
``--records-from`` fits on their files without parsing.

``--steps-from`` fits on every step of whole parses instead: the heads each step of
``parse_threshold.py --verifier-top-k 100 --choose [--refine]`` chose among
(``ParsedInstance.heads``, recorded in its ``parsed`` steps with ``hit``: the head matches a
true instance that no earlier step found, IoU >= 0.5). On later steps earlier instances have
claimed part of the scene, which the first-step records never show; ``--extra "visible
fraction"`` lets the choice weigh the share of a head that is still unclaimed (with
``--keep-shipped`` the shipped choice's weights are kept and only that weight is fitted; when
the shipped choice is itself such a fit, the choice it kept). The fitted choice offers as many
heads per category as the parses did (``HeadChoice.per_category``, ``parse_threshold.py
--heads-per-category``).
The L2 weight is chosen by the hit rate of fits without the scene (``--folds`` folds of
scenes); reported beside the shipped choice and the fit without the extra feature on the same
steps, on first and later steps apart. (Offline: a different choice would change what later
steps see; the parse itself measures the choice, ``parse_threshold.py``/``parsing.py`` with it
shipped.)

Usage: ``python benchmarks/fit_head_choice.py --scenes 20 --first 0 --records-out A.json``;
``python benchmarks/fit_head_choice.py --records-from A.json B.json [--ship]``;
``python benchmarks/fit_head_choice.py --steps-from STEPS.json --extra "visible fraction"
[--ship]``
"""

from __future__ import annotations

import argparse
import json
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
from pyro_backpass.parsing import (  # noqa: E402
    EXTRA_HEAD_FEATURES,
    HEAD_CHOICE_FILE,
    HEAD_FEATURES,
    HeadChoice,
    Query,
    default_threshold,
    fit_head_choice,
    region_log_prob,
    run_parse,
)

TOP_K = 100
HIT = 0.5
L2_GRID = (0.01, 0.1, 1.0, 10.0)
PACKAGE_FILE = Path(__file__).parents[1] / "pyro_backpass" / "weights" / HEAD_CHOICE_FILE


def head_record(inst, known: list, truth: torch.Tensor, image: torch.Tensor, gm) -> dict:
    """One category's first-step head: what the parser's choice reads, and whether it hits."""
    iou = mask_iou(inst.mask[None].expand_as(truth), truth)  # (n,)
    cats = list(gm.categories)
    index = [gm.backbone.categories.index(c) for c in cats]
    logp = region_log_prob(gm.backbone, image, inst.mask[None].expand(len(cats), -1, -1), index)
    return {
        "category": inst.category,
        "llr": float(inst.llr),
        "visible": float(inst.mask.sum()),
        "amodal": float(inst.amodal_mask.sum()),
        "class_log_probs": dict(zip(cats, logp.tolist(), strict=True)),
        "best_iou": float(iou.max()),
        "hit": bool(iou.max() >= HIT),
    }


@torch.no_grad()
def collect(args: argparse.Namespace) -> dict:
    gm, model_name = learned_model(smoke=False, path=None)  # the shipped verifier's model
    verifier = DescentVerifier.shipped()
    if verifier is None:
        raise SystemExit("no shipped descent verifier: run benchmarks/fit_verifier.py --ship")
    stop = default_threshold(gm, verifier=verifier, top_k=args.top_k)
    n = 1 if args.smoke else args.scenes
    scenes = parse_scenes(args.split, args.first + n)[args.first :]
    cats = gm.categories[:2] if args.smoke else gm.categories
    records, start = [], time.perf_counter()
    for k, scene in enumerate(tqdm(scenes, desc="scenes")):
        known = [t for t in scene.instances if t.category in gm.categories and t.mask.any()]
        truth = torch.stack([t.mask for t in known])  # (n, H, W)
        heads = []
        for c in cats:
            inst = run_parse(gm, scene.image, top_k=args.top_k, max_objects=1,
                             threshold=-math.inf, criterion=stop["criterion"],
                             verifier=verifier, query=Query(category=c)).instances[0]  # fmt: skip
            heads.append(head_record(inst, known, truth, scene.image, gm))
        records.append({"scene": args.first + k, "heads": heads})
    out = {"machine": machine(), "threads": 1, "model": model_name,
           "model_sha256": model_fingerprint(gm), "verifier_sha256": verifier.fingerprint(),
           "split": args.split, "first": args.first, "scenes": n, "top_k": args.top_k,
           "categories": list(cats), "records": records,
           "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    atomic_write_json(args.records_out, out)
    print(f"wrote {args.records_out}")
    return out


def model_fingerprint(gm) -> str:
    from pyro_backpass.parsing import model_fingerprint as fingerprint

    return fingerprint(gm)


def chosen_hit(choice: HeadChoice, heads: list[dict]) -> bool:
    """Whether the head ``choice`` scores highest hits (ties: the first)."""
    return bool(heads[choice.choose(heads)]["hit"])


def near_misses(scenes: list[list[list[dict]]]) -> dict:
    """The steps whose chosen head (as parsed: the first) misses while another hits, by the
    chosen head's best IoU with an unfound true instance (readout masks, before any CRF): a
    part of an object (0.3 to 0.5), a fragment (0.1 to 0.3), nothing of one (< 0.1)."""
    missed = [g[0]["best_iou"] for st in scenes for g in st
              if not g[0]["hit"] and any(h["hit"] for h in g)]  # fmt: skip
    return {"steps": len(missed), "part_0.3_0.5": sum(0.3 <= v < 0.5 for v in missed),
            "fragment_0.1_0.3": sum(0.1 <= v < 0.3 for v in missed),
            "nothing_below_0.1": sum(v < 0.1 for v in missed)}  # fmt: skip


def leave_one_out(groups: list[list[dict]], categories: tuple[str, ...], l2: float) -> float:
    """The share of steps whose chosen head hits, each step scored by a fit without it."""
    return statistics.mean(
        float(chosen_hit(fit_head_choice(groups[:i] + groups[i + 1 :], categories=categories,
                                         l2=l2), g))
        for i, g in enumerate(groups)
    )  # fmt: skip


def scene_held_out(
    scenes: list[list[list[dict]]], categories: tuple[str, ...], l2: float, extra: tuple,
    *, folds: int, base: HeadChoice | None = None,
) -> list[list[bool]]:  # fmt: skip
    """Per scene, per step: whether the head chosen by a fit on the other folds' scenes hits
    (scene ``i`` in fold ``i % folds``)."""
    out: list[list[bool]] = [[] for _ in scenes]
    for f in range(folds):
        rest = [g for j, other in enumerate(scenes) if j % folds != f for g in other]
        choice = fit_head_choice(rest, categories=categories, l2=l2, extra=extra, base=base)
        for i in range(f, len(scenes), folds):
            out[i] = [chosen_hit(choice, g) for g in scenes[i]]
    return out


def hit_rates(hits: list[list[bool]]) -> dict:
    """Share of steps that hit: all, first steps, later steps (and how many of each)."""
    first = [h[0] for h in hits if h]
    later = [x for h in hits for x in h[1:]]
    every = first + later
    return {"all": statistics.mean(every), "first": statistics.mean(first),
            "later": statistics.mean(later) if later else None,
            "steps": len(every), "later_steps": len(later)}  # fmt: skip


def fit_steps(args: argparse.Namespace) -> dict:
    """``--steps-from``: the choice fitted on every step's heads of no-stop choice parses."""
    saved = [json.loads(Path(f).read_text()) for f in args.steps_from]
    for key in ("model_sha256", "verifier_sha256", "verifier_top_k", "head_choice_sha256",
                "refine_masks"):  # fmt: skip
        if len({json.dumps(s.get(key)) for s in saved}) != 1:
            raise SystemExit(f"the step files differ in {key}: fit on one kind of parse")
    first = saved[0]
    if not first.get("choose"):
        raise SystemExit(f"{args.steps_from[0]} holds no choice parse (parse_threshold.py "
                         "--verifier-top-k K --choose): its steps record no heads")  # fmt: skip
    extra = tuple(args.extra)
    # One list per scene of its steps' heads (steps with one head or none that hits say
    # nothing about the choice; fit_head_choice leaves them out, the hit rates count them).
    scenes = [[step for step in parsed["heads"] if step]
              for s in saved for row in s["settings"].values() for parsed in row["parsed"]
              if parsed.get("heads")]  # fmt: skip
    if not scenes:
        raise SystemExit("the step files record no heads: parse again with this version")
    categories = tuple(scenes[0][0][0]["class_log_probs"])
    groups = [g for steps in scenes for g in steps]
    shipped = HeadChoice.shipped()  # compared only on steps it could have chosen
    if shipped is not None and (shipped.categories != categories
                                or shipped.model_sha256 != first["model_sha256"]):  # fmt: skip
        shipped = None
    folds = min(args.folds, len(scenes))
    kept = None
    if args.keep_shipped:  # only the extra features' weights are fitted; the rest is kept
        kept = shipped
        if kept is not None and kept.extra:  # itself a kept choice with extras: keep its base
            from importlib import resources  # where HeadChoice.shipped() reads it

            ref = resources.files("pyro_backpass").joinpath("weights", HEAD_CHOICE_FILE)
            record = json.loads(ref.read_text()).get("kept_shipped")
            kept = None if record is None else HeadChoice.from_dict(record)
        if (kept is None or kept.extra or kept.categories != categories
                or kept.model_sha256 != first["model_sha256"]):  # fmt: skip
            raise SystemExit("--keep-shipped needs a shipped choice for these steps' model and "
                             "categories without extra features (or that it kept)")  # fmt: skip
    grid = {l2: scene_held_out(scenes, categories, l2, extra, folds=folds, base=kept)
            for l2 in L2_GRID}  # fmt: skip
    best = max(L2_GRID, key=lambda l2: (hit_rates(grid[l2])["all"], l2))
    base = {l2: scene_held_out(scenes, categories, l2, (), folds=folds) for l2 in L2_GRID}
    base_best = max(L2_GRID, key=lambda l2: (hit_rates(base[l2])["all"], l2))
    choice = fit_head_choice(groups, categories=categories, l2=best, base=kept,
                             model_sha256=first["model_sha256"], extra=extra,
                             per_category=first.get("heads_per_category") or 1,
                             refined_heads=bool(first.get("refined_heads")))  # fmt: skip
    result = {
        "machine": machine(), "model": "GenerativeModel.default()",
        "model_sha256": first["model_sha256"], "verifier_sha256": first["verifier_sha256"],
        "top_k": first["verifier_top_k"], "split": first["split"], "scenes": len(scenes),
        "fitted_on": "every step of no-stop choice parses",
        "kept_shipped": None if kept is None else kept.to_dict(),
        "parsed_with": {"head_choice_sha256": first["head_choice_sha256"],
                        "refine_masks": first["refine_masks"],
                        "heads_per_category": first.get("heads_per_category"),
                        "refined_heads": first.get("refined_heads")},
        "features": [*HEAD_FEATURES, *extra], "extra": list(extra), "l2_grid": list(L2_GRID),
        "folds": folds, "held_out_hit": {str(k): hit_rates(v) for k, v in grid.items()},
        "l2": best,
        "hit": {
            "as_parsed": hit_rates([[bool(g[0]["hit"]) for g in st] for st in scenes]),
            "shipped_choice": None if shipped is None else hit_rates(
                [[chosen_hit(shipped, g) for g in st] for st in scenes]),
            "fitted_choice_in_sample": hit_rates([[chosen_hit(choice, g) for g in st]
                                                  for st in scenes]),
            "fitted_choice_held_out": hit_rates(grid[best]),
            "without_extra_held_out": hit_rates(base[base_best]),
            "any_head": hit_rates([[any(h["hit"] for h in g) for g in st] for st in scenes]),
        },
        "misses": near_misses(scenes),
        "head_choice": choice.to_dict(),
        "fitted_by": "benchmarks/fit_head_choice.py --steps-from",
        "record_files": [str(f) for f in args.steps_from],
    }  # fmt: skip
    return _write(args, result, ("held_out_hit", "l2", "hit"))


def fit(args: argparse.Namespace) -> dict:
    """``--records-from``: the choice fitted on the collected heads, its L2 weight chosen by
    leave-one-scene-out hit rate; ``--ship`` writes it into the package."""
    saved = [json.loads(Path(f).read_text()) for f in args.records_from]
    for key in ("model_sha256", "verifier_sha256", "top_k", "categories", "split"):
        if len({json.dumps(s[key]) for s in saved}) != 1:
            raise SystemExit(f"the record files differ in {key}: fit on one collection")
    first = saved[0]
    categories = tuple(first["categories"])
    groups = [r["heads"] for s in saved for r in s["records"]]
    loo = {l2: leave_one_out(groups, categories, l2) for l2 in L2_GRID}
    best = max(L2_GRID, key=lambda l2: (loo[l2], l2))  # ties: the stronger penalty
    choice = fit_head_choice(groups, categories=categories, l2=best,
                             model_sha256=first["model_sha256"])  # fmt: skip

    def own(h: dict) -> float:
        return h["class_log_probs"][h["category"]]

    result = {
        "machine": machine(), "model": first["model"], "model_sha256": first["model_sha256"],
        "verifier_sha256": first["verifier_sha256"], "top_k": first["top_k"],
        "split": first["split"], "scenes": len(groups),
        "features": list(HEAD_FEATURES), "l2_grid": list(L2_GRID),
        "leave_one_out_hit": {str(k): v for k, v in loo.items()}, "l2": best,
        "hit": {
            "fitted_choice_in_sample": statistics.mean(float(chosen_hit(choice, g))
                                                       for g in groups),
            "fitted_choice_leave_one_out": loo[best],
            "max_class_log_prob": statistics.mean(float(max(g, key=own)["hit"])
                                                  for g in groups),
            "airplane_head": statistics.mean(float(next(h for h in g if h["category"] ==
                                                        "airplane")["hit"]) for g in groups)
            if "airplane" in categories else None,
            "any_head": statistics.mean(float(any(h["hit"] for h in g)) for g in groups),
        },
        "head_choice": choice.to_dict(),
        "fitted_by": "benchmarks/fit_head_choice.py",
        "record_files": [str(f) for f in args.records_from],
    }  # fmt: skip
    return _write(args, result, ("leave_one_out_hit", "l2", "hit"))


def _write(args: argparse.Namespace, result: dict, shown: tuple[str, ...]) -> dict:
    """The fit's report to ``--out`` (default ``head_choice_fit[_steps].json``) and, with
    ``--ship``, the choice into the package."""
    steps = args.steps_from is not None
    out = args.out or RESULTS / ("head_choice_fit_steps.json" if steps else "head_choice_fit.json")
    atomic_write_json(out, result)
    if args.ship:
        atomic_write_json(args.package_file, {k: v for k, v in result.items()
                                              if k not in ("machine", "record_files")})  # fmt: skip
        print(f"shipped {args.package_file}")
    print(json.dumps({k: result[k] for k in shown}, indent=1))
    print(f"wrote {out}")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--scenes", type=int, default=40)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=TOP_K)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--records-out", type=Path, default=RESULTS / "head_choice_records.json")
    parser.add_argument("--records-from", type=Path, nargs="+", default=None)
    parser.add_argument(
        "--steps-from",
        type=Path,
        nargs="+",
        default=None,
        help="fit on every step's heads of parse_threshold.py --choose runs",
    )
    parser.add_argument(
        "--extra",
        nargs="*",
        default=[],
        choices=EXTRA_HEAD_FEATURES,
        help="with --steps-from: optional features the choice weighs",
    )
    parser.add_argument(
        "--folds",
        type=int,
        default=10,
        help="with --steps-from: folds of scenes for the held-out hit rates",
    )
    parser.add_argument(
        "--keep-shipped",
        action="store_true",
        help="with --steps-from and --extra: keep the shipped choice's weights "
        "and fit only the extra features' (a veto of claimed heads)",
    )
    parser.add_argument("--ship", action="store_true", help="write it into the package")
    parser.add_argument("--package-file", type=Path, default=PACKAGE_FILE)
    parser.add_argument("--out", type=Path, default=None, help="the fit's report (JSON)")
    args = parser.parse_args(argv)
    if args.records_from is not None and args.steps_from is not None:
        parser.error("--records-from and --steps-from fit on different records: give one")
    if args.keep_shipped and not args.extra:
        parser.error("--keep-shipped fits only --extra features: name some")
    if args.extra and args.steps_from is None:
        parser.error("--extra needs --steps-from (first-step records never show a claimed head)")
    torch.set_num_threads(1)
    if args.steps_from is not None:
        return fit_steps(args)
    return collect(args) if args.records_from is None else fit(args)


if __name__ == "__main__":
    main()
