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

Usage: ``python benchmarks/fit_head_choice.py --scenes 20 --first 0 --records-out A.json``;
``python benchmarks/fit_head_choice.py --records-from A.json B.json [--ship]``
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


def leave_one_out(groups: list[list[dict]], categories: tuple[str, ...], l2: float) -> float:
    """The share of steps whose chosen head hits, each step scored by a fit without it."""
    return statistics.mean(
        float(chosen_hit(fit_head_choice(groups[:i] + groups[i + 1 :], categories=categories,
                                         l2=l2), g))
        for i, g in enumerate(groups)
    )  # fmt: skip


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
    out = args.out or RESULTS / "head_choice_fit.json"
    atomic_write_json(out, result)
    if args.ship:
        atomic_write_json(args.package_file, {k: v for k, v in result.items()
                                              if k not in ("machine", "record_files")})  # fmt: skip
        print(f"shipped {args.package_file}")
    print(json.dumps({k: result[k] for k in ("leave_one_out_hit", "l2", "hit")}, indent=1))
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
    parser.add_argument("--ship", action="store_true", help="write it into the package")
    parser.add_argument("--package-file", type=Path, default=PACKAGE_FILE)
    parser.add_argument("--out", type=Path, default=None, help="the fit's report (JSON)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    return collect(args) if args.records_from is None else fit(args)


if __name__ == "__main__":
    main()
