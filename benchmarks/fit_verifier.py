"""Fit the descent verifier of issue #10 (:func:`~pyro_backpass.fit_descent_verifier`) for the
shipped model, choose its kind (an L2 penalty, or an ensemble of networks) on validation
scenes, and ship it.

Training scenes come from the ``train`` split (seeds never used for validation or test). For
each scene, greedy's ``top_k`` best top-level hypotheses of the category are completed and
their features computed (:func:`~pyro_backpass.learning.descent_examples`), in ``--workers``
processes of one thread each. ``--objects N`` adds N lone rendered objects per category
(default render scale, ``train`` split) as one-instance training scenes, and
``--validation-objects M`` scores the choice on M lone validation objects per category too (a
verifier fitted on scenes only chooses worse than ``greedy_map`` on lone objects). Every L2
in ``--l2`` is fitted on all training examples and scored on the validation scenes' descents:
the share of scenes whose highest-scored descent hits an airplane (IoU ≥ 0.5 / 0.3) and its
mean IoU. ``--hidden H`` adds a candidate beside the linear ones: an ensemble of
``--ensemble`` networks with H hidden ReLU units (``fit_descent_verifier(hidden=H)``). The
best candidate by validation hit@0.5 (ties: hit@0.3, then the lone objects' IoU) is written to
``pyro_backpass/weights/descent_verifier.safetensors`` with ``--ship``.
``--score FILE...`` scores existing verifiers (e.g. the shipped file) on the same validation
examples, for a refit to be compared with what it would replace (with ``--scenes 0
--objects 0``: only that). Results: ``benchmarks/results/fit_verifier.json``.

Usage: ``python benchmarks/fit_verifier.py --scenes 500 --validation 60 --workers 2 --ship``
(with lone objects and the ensemble: ``--objects 200 --validation-objects 40 --hidden 64``)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, learned_model, machine  # noqa: E402

import pyro_backpass  # noqa: E402
from pyro_backpass import (  # noqa: E402
    DescentVerifier,
    RenderedObjects,
    Scenes,
    fit_descent_verifier,
    split_seed,
)
from pyro_backpass.files import atomic_write, atomic_write_json  # noqa: E402
from pyro_backpass.inference import verifier_fingerprint  # noqa: E402
from pyro_backpass.learning import VerifierExample, descent_examples  # noqa: E402

WEIGHTS = Path(pyro_backpass.__file__).parent / "weights" / "descent_verifier.safetensors"


def lone_objects(category: str, n: int, split: str) -> RenderedObjects:
    """``n`` lone objects of ``category`` at the default render scale, seeds of ``split``."""
    return RenderedObjects(category, n, seed=split_seed(split))


def _as_scene(category: str, item: tuple) -> SimpleNamespace:
    """A lone object as a one-instance scene (what ``descent_examples`` reads)."""
    image, mask = item
    return SimpleNamespace(image=image, instances=[SimpleNamespace(category=category, mask=mask)])


def _examples(args: tuple, gm=None) -> list:
    """One worker's examples: scenes (or lone objects) ``indices`` of ``split`` (one thread)."""
    split, n, indices, top_k, categories, objects, model, progress, refine = args
    torch.set_num_threads(1)
    if gm is None:
        gm, _ = learned_model(smoke=False, path=model)
    if objects:  # one category a job (examples() calls it so)
        ds = lone_objects(categories[0], n, split)
        items = [_as_scene(categories[0], ds[i]) for i in indices]
    else:
        scenes = Scenes(n, seed=split_seed(split))
        items = [scenes[i] for i in indices]
    return descent_examples(gm, items, top_k=top_k, categories=categories, progress=progress,
                            refine=refine)  # fmt: skip


def examples(split: str, n: int, *, gm, workers: int, top_k: int, categories, model,
             cache: Path | None, objects: bool = False, refine: bool = False) -> list:  # fmt: skip
    """Every category's examples on ``n`` scenes (``objects``: lone objects per category) of
    ``split``; with ``cache``, each category's are read from (or written to)
    ``cache/<model>/<split>_[objects_]<category>_n<n>_k<top_k>[_crf].pt``, ``<model>`` the
    start of the model's and backbone's fingerprint (descents of another model are never read);
    ``refine``: the descents' masks are the colour CRF's (``_crf``)."""
    out = []
    if n <= 0:
        return out
    if cache is not None:
        cache = cache / verifier_fingerprint(gm)[:16]
    for category in categories:
        stem = f"{split}_objects_{category}" if objects else f"{split}_{category}"
        tail = f"_k{top_k}_crf" if refine else f"_k{top_k}"
        path = None if cache is None else cache / f"{stem}_n{n}{tail}.pt"
        if path is not None and path.is_file():
            out += [VerifierExample(**e) for e in torch.load(path)]
            continue
        # Item i does not depend on n: a cache of the first n0 < n items is extended.
        mine, n0 = [], 0
        if cache is not None:
            done = sorted((int(f.stem.split("_n")[-1].split("_")[0]), f)
                          for f in cache.glob(f"{stem}_n*{tail}.pt"))  # fmt: skip
            done = [(m, f) for m, f in done if m < n]
            if done:
                n0, f = done[-1]
                mine = [VerifierExample(**e) for e in torch.load(f)]
                print(f"{split} {category}: {n0} scenes' descents from {f}", flush=True)
        parts = [list(range(n0 + w, n, workers)) for w in range(workers)]
        jobs = [(split, n, p, top_k, [category], objects, model, w == 0, refine)
                for w, p in enumerate(parts) if p]  # fmt: skip
        if workers == 1:
            mine += _examples(jobs[0], gm)
        else:
            with ProcessPoolExecutor(workers) as pool:
                mine += [ex for part in pool.map(_examples, jobs) for ex in part]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp, m=mine: torch.save([vars(e) for e in m], tmp))
        out += mine
    return out


def choice_quality(verifier, examples_: list) -> dict:
    """Share of the examples whose highest-scored descent hits (IoU ≥ 0.5, ≥ 0.3), its mean
    IoU, and the same for the descent with the largest log-joint (what ``greedy_map(...,
    top_k=k)`` returns as the MAP) and for the best of the k by IoU
    (the bound)."""
    if not examples_:
        return {"examples": 0}
    if not bool(verifier.fitted[examples_[0].category]):  # no training scene had a hit
        return {"examples": len(examples_), "fitted": False}
    iou, by_lj, bound = [], [], []
    for ex in examples_:
        s = verifier.score(ex.features, ex.category)
        iou.append(float(ex.iou[int(s.argmax())]))
        by_lj.append(float(ex.iou[0]))  # modes are listed by log-joint, best first
        bound.append(float(ex.iou.max()))

    def row(v):
        return {"hit@0.5": statistics.mean(float(x >= 0.5) for x in v),
                "hit@0.3": statistics.mean(float(x >= 0.3) for x in v),
                "iou": statistics.mean(v)}  # fmt: skip

    return {"examples": len(examples_), "verified": row(iou), "by_log_joint": row(by_lj),
            "best_of_k": row(bound)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=500, help="training scenes")
    parser.add_argument("--validation", type=int, default=60, help="validation scenes")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--categories", nargs="+", default=["airplane"])
    parser.add_argument("--l2", type=float, nargs="+", default=[1.0, 10.0, 100.0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--ship", action="store_true", help="write the package's weights file")
    parser.add_argument("--save", type=Path, default=None,
                        help="write the verifier (the shipped one's other categories kept) here "
                             "instead, to measure it before shipping")  # fmt: skip
    parser.add_argument("--base", type=Path, default=None,
                        help="with --save: the verifier file whose other categories are kept "
                             "(default: the shipped one)")  # fmt: skip
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep each split's and category's descents here (reused)")  # fmt: skip
    parser.add_argument("--objects", type=int, default=0,
                        help="lone training objects per category added to the scenes")  # fmt: skip
    parser.add_argument("--validation-objects", type=int, default=0,
                        help="lone validation objects a category scored")  # fmt: skip
    parser.add_argument("--hidden", type=int, default=0,
                        help="also fit an ensemble of networks with this many hidden units "
                             "(a candidate beside each L2's linear verifier)")  # fmt: skip
    parser.add_argument("--ensemble", type=int, default=3, help="networks in the ensemble")
    parser.add_argument("--epochs", type=int, default=10, help="the networks' epochs")
    parser.add_argument("--seed", type=int, default=0, help="the networks' first seed")
    parser.add_argument("--score", type=Path, nargs="*", default=[],
                        help="verifier files (e.g. the shipped one) scored on the same "
                             "validation scenes and objects; with --scenes 0 and --objects 0, "
                             "only that (no fit)")  # fmt: skip
    parser.add_argument("--refine", action="store_true",
                        help="the descents' masks (features and hits) are the colour "
                             "CRF's, for a verifier that chooses by refined masks")  # fmt: skip
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "fit_verifier.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in ("scenes", "validation", "objects", "validation_objects", "hidden"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.smoke:
        args.scenes, args.validation = min(args.scenes, 3), min(args.validation, 2)
        args.top_k, args.workers = 4, 1
        args.objects = min(args.objects, 2)
        args.validation_objects = min(args.validation_objects, 1)
    # The smoke preset runs the shipped model on a few scenes (no model is trained).
    gm, model_name = learned_model(smoke=False, path=args.model)
    common = dict(gm=gm, workers=args.workers, top_k=args.top_k, categories=args.categories,
                  model=args.model, cache=args.cache, refine=args.refine)  # fmt: skip
    start = time.perf_counter()
    train = examples("train", args.scenes, **common)
    val = examples("validation", args.validation, **common)
    train_obj = examples("train", args.objects, objects=True, **common)
    val_obj = examples("validation", args.validation_objects, objects=True, **common)
    extract_s = time.perf_counter() - start
    scored = {}
    for file in args.score:
        other = DescentVerifier.load(file)
        scored[str(file)] = {
            c: {"validation": choice_quality(other, [e for e in val if e.category == i]),
                "validation_objects": choice_quality(
                    other, [e for e in val_obj if e.category == i])}
            for c, i in ((c, gm.categories.index(c)) for c in args.categories)
        }  # fmt: skip
        print(file, scored[str(file)], flush=True)
    if args.score and not train + train_obj:  # scoring only
        atomic_write_json(args.out, {
            "machine": machine(), "threads": 1, "workers": args.workers, "model": model_name,
            "validation_scenes": args.validation, "validation_objects": args.validation_objects,
            "top_k": args.top_k, "categories": args.categories,
            "extract_seconds": round(extract_s, 1), "scored": scored})  # fmt: skip
        print(f"wrote {args.out}")
        return
    rows, fits = {}, {}
    # Candidates: a linear verifier per L2 (keys str(l2)) and, with --hidden, the ensemble.
    kinds = {str(l2): dict(l2=l2) for l2 in args.l2}
    if args.hidden:
        kinds[f"hidden={args.hidden}"] = dict(hidden=args.hidden, ensemble=args.ensemble,
                                              epochs=args.epochs, seed=args.seed)  # fmt: skip
    for name, kw in kinds.items():
        t = time.perf_counter()
        fits[name] = fit_descent_verifier(gm, examples=train + train_obj, top_k=args.top_k,
                                          progress=False, **kw)  # fmt: skip
        rows[name] = {
            c: {"validation": choice_quality(fits[name], [e for e in val if e.category == i]),
                "train": choice_quality(fits[name], [e for e in train if e.category == i]),
                "validation_objects": choice_quality(
                    fits[name], [e for e in val_obj if e.category == i])}
            for c, i in ((c, gm.categories.index(c)) for c in args.categories)
        }  # fmt: skip
        rows[name]["fit_seconds"] = round(time.perf_counter() - t, 1)
        print(name, rows[name], flush=True)

    # Each category's verifier is fitted independently: its kind (an L2, or the ensemble) is
    # chosen on its own validation scenes (hit@0.5, then hit@0.3, then the lone validation
    # objects' IoU), and the shipped verifier takes each category's from the chosen fit.
    def quality(category: str, name: str) -> tuple[float, float, float]:
        row = rows[name][category]["validation"].get("verified", {})
        lone = rows[name][category]["validation_objects"].get("verified", {})
        return row.get("hit@0.5", -1.0), row.get("hit@0.3", -1.0), lone.get("iou", -1.0)

    chosen = {c: max(kinds, key=lambda v, c=c: quality(c, v)) for c in args.categories}
    record = {
        "machine": machine(), "threads": 1, "workers": args.workers, "model": model_name,
        "train_scenes": args.scenes, "validation_scenes": args.validation, "top_k": args.top_k,
        "train_objects": args.objects, "validation_objects": args.validation_objects,
        "categories": args.categories, "refine": args.refine, "train_examples": len(train),
        "train_examples_with_hit": sum(bool(e.hits.any()) for e in train),
        "validation_examples": len(val), "extract_seconds": round(extract_s, 1),
        "l2": {k: v for k, v in rows.items() if k in map(str, args.l2)},
        "hidden": {k: v for k, v in rows.items() if k not in map(str, args.l2)},
        "hidden_options": {"hidden": args.hidden, "ensemble": args.ensemble,
                           "epochs": args.epochs, "seed": args.seed} if args.hidden else None,
        "scored": scored,
        "chosen": chosen,
        "chosen_l2": {c: max(args.l2, key=lambda v, c=c: quality(c, str(v)))
                      for c in args.categories},
        "verified": {c: quality(c, chosen[c]) for c in args.categories},
        "shipped": False,
    }  # fmt: skip
    atomic_write_json(args.out, record)  # first: a failure below loses no measurement
    verifier = fits[chosen[args.categories[0]]]
    shipped = None
    if args.base is not None and args.save is not None:
        shipped = DescentVerifier.load(args.base)
    elif args.ship or args.save:
        shipped = DescentVerifier.shipped()
    if shipped is not None and shipped.same_setup(verifier):
        verifier = shipped  # the other categories keep their shipped weights
    elif shipped is not None:
        print(f"the shipped verifier {shipped} was made for another model, top_k, features or "
              f"masks: only {args.categories} will have weights")  # fmt: skip
    for c, name in chosen.items():
        if bool(fits[name].fitted[gm.categories.index(c)]):  # else no hit: keep what is there
            verifier = verifier.with_category(fits[name], c)
    if args.save is not None:
        verifier.save(args.save)
        print(f"wrote {args.save}")
    if args.ship and not args.smoke:
        verifier.save(WEIGHTS)
        record["shipped"] = True
        atomic_write_json(args.out, record)
        print(f"wrote {WEIGHTS}; the verified parse's stop criterion is now stale: rerun "
              "benchmarks/parse_threshold.py --verifier-top-k 100 --workers 2")  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
