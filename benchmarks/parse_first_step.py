"""Issue #11: where the verified parse's first step goes, and what it could have chosen.

On the parse benchmark's scenes (``parsing.py``'s ``parse_scenes``: 2–3 airplanes, 0–3
distractors, clutter, occlusion levels in turn), one step of the verified parse with the CRF
on its masks — ``run_parse(image, top_k=100, max_objects=1, threshold=-inf,
refine_masks=True, verifier=…, criterion=<the verified criterion>)``, the first instance the
full parse (*ours_verified100_crf* of ``parsing.json``) would report — in these rows:

- ``shipped_free`` / ``airplane_refined_free``: the category free, with the shipped verifier
  for every category, or with #10's refined airplane verifier
  (``DescentVerifier.shipped(refined=True)``) choosing airplanes' modes;
- ``shipped_<category>``: the category clamped (``Query(category=…)``), the shipped verifier:
  that category's head as the parse would see it were its top-k all of that category;
- ``airplane_refined_airplane``: the airplane head chosen by the refined verifier
  (``verified_consensus.py``'s first pass, on these scenes).

Per row: the share of scenes whose first instance matches a true instance of a known category
at visible-mask IoU ≥ 0.5 (``hit``), one of the airplanes (``hit_airplane``), a true instance of
its own category (``category_right``), the category chosen, and the instance's stop statistic.
From the per-scene records (in the JSON), choices the step could have made:

- ``oracle_any_head``: some clamped head (shipped verifier, any category) hits;
- ``max_stat_over_heads``: the clamped head of largest stop statistic — the free step were each
  category given its own top-k (k modes per category instead of k in all);
- ``max_class_log_prob_over_heads``: the clamped head whose visible region the backbone's
  classifier reads as its category with the largest log-probability (``region_log_prob``);
- ``free_top_k_share``: how many of the free step's k modes each category has;
- ``fitted_choice`` (``--records-from RUN.json --fit-choice-on VALIDATION.json``): the head of
  largest score under a conditional logit fitted on another split's records
  (``pyro_backpass.parsing.fit_head_choice``, L2 0.1), scored on these.

One thread. Writes ``benchmarks/results/parse_first_step.json`` (``--out``).

Usage: ``python benchmarks/parse_first_step.py [--split test] [--scenes 50] [--smoke]``
"""

from __future__ import annotations

import argparse
import collections
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
from fit_head_choice import HIT, head_record  # noqa: E402
from parsing import parse_scenes  # noqa: E402

from pyro_backpass import DescentVerifier  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.learning import mask_iou  # noqa: E402
from pyro_backpass.parsing import (  # noqa: E402
    HEAD_FEATURES,
    HeadChoice,
    Query,
    default_threshold,
    fit_head_choice,
    run_parse,
)

TOP_K = 100
CHOICE_L2 = 0.1  # fit_head_choice's penalty for --fit-choice-on


def judge(inst, known: list, truth: torch.Tensor, image: torch.Tensor, gm) -> dict:
    """One first instance against the scene's true instances of known categories: what the
    parser's head choice reads (``fit_head_choice.head_record``: the backbone's
    log-probabilities of each category on its visible region, the stop criterion's
    ``class_log_prob`` feature), its stop statistic, and whether it matches an airplane or a
    true instance of its own category."""
    iou = mask_iou(inst.mask[None].expand_as(truth), truth)  # (n,)
    planes = [float(v) for v, t in zip(iou, known, strict=True) if t.category == "airplane"]
    same = [float(v) for v, t in zip(iou, known, strict=True) if t.category == inst.category]
    return head_record(inst, known, truth, image, gm) | {
        "stat": float(inst.score),
        "hit_airplane": bool(planes and max(planes) >= HIT),
        "category_right": bool(same and max(same) >= HIT),
    }


def summarise(records: list[dict], categories: tuple[str, ...]) -> dict:
    """The rows' shares, and the choices the step could have made, from per-scene records."""
    rows: dict[str, dict] = {}
    for name in records[0]["rows"]:
        got = [r["rows"][name] for r in records]
        keys = ("hit", "hit_airplane", "category_right", "best_iou", "stat")
        rows[name] = {k: statistics.mean(float(g[k]) for g in got) for k in keys}
        rows[name]["chose"] = dict(collections.Counter(g["category"] for g in got))
        rows[name]["median_seconds"] = statistics.median(r["seconds"][name] for r in records)
    heads = [f"shipped_{c}" for c in categories]
    present = [r for r in records if all(h in r["rows"] for h in heads)]
    choices = {}
    if present:
        best = [max((r["rows"][h] for h in heads), key=lambda g: g["stat"]) for r in present]
        choices["max_stat_over_heads"] = {
            k: statistics.mean(float(g[k]) for g in best)
            for k in ("hit", "hit_airplane", "category_right")
        }  # fmt: skip
        choices["max_stat_over_heads"]["chose"] = dict(
            collections.Counter(g["category"] for g in best)
        )

        def own_class(g: dict) -> float:
            return g["class_log_probs"][g["category"]]

        by_class = [max((r["rows"][h] for h in heads), key=own_class) for r in present]
        choices["max_class_log_prob_over_heads"] = {
            k: statistics.mean(float(g[k]) for g in by_class)
            for k in ("hit", "hit_airplane", "category_right")
        }  # fmt: skip
        choices["oracle_any_head"] = statistics.mean(
            float(any(r["rows"][h]["hit"] for h in heads)) for r in present)  # fmt: skip
        # the free step missed while some head hit: which head, and its statistic's rank
        lost = [r for r in present if not r["rows"]["shipped_free"]["hit"]
                and any(r["rows"][h]["hit"] for h in heads)]  # fmt: skip
        choices["free_missed_a_hitting_head"] = len(lost) / len(present)
        ranks = []
        for r in lost:
            order = sorted(heads, key=lambda h: -r["rows"][h]["stat"])
            ranks.append(min(order.index(h) for h in heads if r["rows"][h]["hit"]) + 1)
        choices["rank_by_stat_of_the_best_hitting_head_when_missed"] = dict(
            sorted(collections.Counter(ranks).items()))  # fmt: skip
        pairs = [(r["rows"][h]["stat"], r["rows"][h]["hit"]) for r in present for h in heads]
        choices["stat_auc_hit_vs_miss_heads"] = auc(pairs)
    share = collections.Counter()
    for r in records:
        share.update(r["free_top_k_categories"])
    total = sum(share.values()) or 1
    choices["free_top_k_share"] = {c: share[c] / total for c in categories}
    return {"rows": rows, "choices": choices}


def auc(pairs: list[tuple[float, bool]]) -> float | None:
    """P(a hit's statistic > a miss's), ties half (Mann–Whitney)."""
    pos = [s for s, h in pairs if h]
    neg = [s for s, h in pairs if not h]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def heads_of(record: dict, categories: tuple[str, ...]) -> list[dict]:
    """One scene's clamped heads (``shipped_<category>``) as ``fit_head_choice`` reads them."""
    return [record["rows"][f"shipped_{c}"] for c in categories]


def fitted_choice(records: list[dict], categories: tuple[str, ...], choice: HeadChoice) -> dict:
    """Each scene's head of largest ``choice`` score (ties: the first): hit shares and the
    categories chosen."""
    chosen = []
    for r in records:
        heads = heads_of(r, categories)
        chosen.append(heads[choice.choose(heads)])
    out = {k: statistics.mean(float(g[k]) for g in chosen)
           for k in ("hit", "hit_airplane", "category_right")}  # fmt: skip
    out["chose"] = dict(collections.Counter(g["category"] for g in chosen))
    return out


def resummarise(args: argparse.Namespace) -> dict:
    """``--records-from``: the summary of saved records, with a choice fitted on another run's
    (``--fit-choice-on``); written to ``--out`` (default: the input file, updated)."""
    saved = json.loads(args.records_from.read_text())
    records = saved["records"]
    categories = tuple(saved.get("categories") or [  # the clamped rows, in the run's order
        k.removeprefix("shipped_") for k in records[0]["rows"]
        if k.startswith("shipped_") and k != "shipped_free"])  # fmt: skip
    summary = summarise(records, categories)
    if args.fit_choice_on is not None:
        train = json.loads(args.fit_choice_on.read_text())
        groups = [heads_of(r, categories) for r in train["records"]]
        choice = fit_head_choice(groups, categories=categories, l2=CHOICE_L2)
        usable = sum(any(h["hit"] for h in g) for g in groups)
        summary["choices"]["fitted_choice"] = {
            **fitted_choice(records, categories, choice),
            "fitted_on": f"{train['split']}: {usable} scenes with a hitting head",
            "features": list(HEAD_FEATURES), "l2": CHOICE_L2, "fit": choice.to_dict(),
        }  # fmt: skip
    out = args.out or args.records_from
    atomic_write_json(out, {**saved, **summary})
    print(json.dumps(summary["choices"], indent=1))
    return summary


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=("validation", "test"), default="test")
    parser.add_argument("--scenes", type=int, default=50)
    parser.add_argument("--first", type=int, default=0, help="skip the first N scenes")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="one scene, two rows (the category free and clamped to airplane)",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=TOP_K,
        help="modes a step (the verified criterion was fitted at 100)",
    )
    parser.add_argument(
        "--records-from",
        type=Path,
        default=None,
        help="summarise the records of an earlier run's JSON instead of parsing",
    )
    parser.add_argument(
        "--fit-choice-on",
        type=Path,
        default=None,
        help="fit the choice across category heads (fit_head_choice) on this run's JSON "
        "(validation) and score it on the records summarised",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.records_from is not None:
        return resummarise(args)
    gm, model_name = learned_model(smoke=False, path=None)
    shipped = DescentVerifier.shipped()
    refined = DescentVerifier.shipped(refined=True)
    if shipped is None or refined is None:
        raise SystemExit("no shipped descent verifiers: run benchmarks/fit_verifier.py --ship")
    stop = default_threshold(gm, verifier=shipped, top_k=args.top_k)  # the verified criterion
    mixed = {**dict.fromkeys(gm.categories, shipped), "airplane": refined}
    runs = {"shipped_free": (shipped, None), "airplane_refined_free": (mixed, None)}
    runs |= {f"shipped_{c}": (shipped, Query(category=c)) for c in gm.categories}
    runs["airplane_refined_airplane"] = (refined, Query(category="airplane"))
    if args.smoke:
        runs = {k: runs[k] for k in ("shipped_free", "shipped_airplane")}
    n = 1 if args.smoke else args.scenes
    scenes = parse_scenes(args.split, args.first + n)[args.first :]
    records = []
    start = time.perf_counter()
    for k, scene in enumerate(tqdm(scenes, desc="scenes")):
        known = [t for t in scene.instances if t.category in gm.categories and t.mask.any()]
        truth = torch.stack([t.mask for t in known])  # (n, H, W)
        record = {"scene": args.first + k, "rows": {}, "seconds": {},
                  "truth": [t.category for t in known]}  # fmt: skip
        for name, (verifier, query) in runs.items():
            t = time.perf_counter()
            parse = run_parse(gm, scene.image, top_k=args.top_k, max_objects=1, threshold=-math.inf,
                              criterion=stop["criterion"], refine_masks=True,
                              verifier=verifier, query=query)  # fmt: skip
            inst = parse.instances[0]
            record["rows"][name] = judge(inst, known, truth, scene.image, gm)
            record["seconds"][name] = time.perf_counter() - t
            if name == "shipped_free":
                record["free_top_k_categories"] = dict(collections.Counter(
                    gm.categories[int(a["category"])] for a, _ in inst.modes))  # fmt: skip
        records.append(record)
    out = args.out or RESULTS / "parse_first_step.json"
    summary = summarise(records, gm.categories)
    atomic_write_json(out, {"machine": machine(), "threads": 1, "model": model_name,
                            "split": args.split, "scenes": n, "first": args.first,
                            "top_k": args.top_k, "stop_criterion_fitted_on": stop["fitted_on"],
                            "categories": list(gm.categories),
                            **summary, "records": records,
                            "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
    for name, s in summary["rows"].items():
        print(name, s)
    print(summary["choices"])
    print(f"wrote {out}")
    return summary


if __name__ == "__main__":
    main()
