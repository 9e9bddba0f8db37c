"""Issue #10, a lever on the verified pass's choice: a verifier fitted on CRF-refined masks, and
choosing by consensus (the descent of highest expected mask IoU under the verifier's softmax)
instead of by the verifier's top score.

The descent verifier (:func:`~pyro_backpass.verified_map`) scores greedy's 100 completed
descents and keeps the best; on validation scenes the best of the 100 covers an airplane far
more often than its choice does. Two changes are measured, one at a time, on cluttered scenes
(2–3 airplanes, distractors, clutter; category clamped to airplane), every mask scored after
the colour CRF (:func:`~pyro_backpass.refine_mask`, its defaults):

- ``shipped``: the shipped verifier, its features on the readout's masks (the reference);
- ``crf``: a verifier fitted the same way (``fit_verifier.py --refine``, airplane) on features
  of the CRF-refined masks (``DescentVerifier(refine_masks=True)``);
- for each, the choice rule: ``argmax`` (the verifier's), or ``consensus τ``: the descent whose
  mask (the one the verifier's features read) has the highest
  :func:`~pyro_backpass.inference.expected_iou` with the k masks under softmax(score / τ).

Per row: the share of scenes whose chosen descent's refined mask has IoU ≥ 0.5 / ≥ 0.3 with one
of the airplanes' visible masks, and its mean best IoU; ``best_of_k``: the same for the best of
the 100 by IoU (the bound). τ is chosen per verifier on ``--split validation`` (hit@0.5, then
mean IoU) and written to ``verified_consensus_validation.json``; on ``--split test`` every τ is
reported, the validation choice marked, and the chosen rows are re-measured end to end
(``verified_map`` with ``verifier.with_consensus(τ)``, then ``refine_mask``) as a check
(``--no-end-to-end``: not).
``--workers`` processes of one thread each. Writes ``verified_consensus_<split>.json`` and a
figure of test scenes where consensus changed the choice.

``--time N`` only times a verified pass plus ``refine_mask`` with the shipped verifier and the
shipped refined one on N test scenes (``verified_consensus_time.json``). ``--ship`` writes
the CRF verifier with the τ chosen on validation (read from
``verified_consensus_validation.json``; nothing is measured) into the package as
``DescentVerifier.shipped(refined=True)``.

Usage: ``python benchmarks/verified_consensus.py --crf-verifier verifier_crf.safetensors
--split validation --workers 2`` then ``... --split test --scenes 40``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    RESULTS,
    hidden_bu,
    learned_model,
    machine,
    panel_figure,
    records_in_workers,
)

import pyro_backpass  # noqa: E402
from pyro_backpass import (  # noqa: E402
    DescentVerifier,
    Scenes,
    greedy_map,
    refine_mask,
    verified_map,
)
from pyro_backpass.data import split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.inference import descent_features, expected_iou, mode_values  # noqa: E402
from pyro_backpass.learning import mask_iou  # noqa: E402
from pyro_backpass.model import REFINED_VERIFIER_FILE  # noqa: E402

TEMPERATURES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0)


def _verifiers(crf_path: Path | None) -> dict[str, DescentVerifier]:
    out = {"shipped": DescentVerifier.shipped()}
    if crf_path is not None:
        out["crf"] = DescentVerifier.load(crf_path)
        if not out["crf"].refine_masks:
            raise SystemExit(f"{crf_path} was not fitted on CRF-refined masks (refine_masks)")
    return out


@torch.no_grad()
def _scene_records(job: tuple) -> list[dict]:
    """One worker's scenes: per scene and verifier, the scores of the k descents and the masks
    its features read (consensus compares them); the refined masks' best IoU with an airplane."""
    split, indices, crf_path, top_k, progress = job
    torch.set_num_threads(1)
    gm, _ = learned_model(smoke=False, path=None)
    verifiers = _verifiers(crf_path)
    scenes = Scenes(max(indices) + 1, seed=split_seed(split))
    airplane = gm.categories.index("airplane")
    out = []
    for i in tqdm(indices, desc=f"{split} scenes", disable=not progress):
        scene = scenes[i]
        planes = [t.mask for t in scene.instances if t.category == "airplane" and t.mask.any()]
        if not planes:
            continue
        bu = hidden_bu(gm, scene.image)
        result = greedy_map(gm, bu, category=airplane, top_k=top_k)
        values, lj = mode_values(result.modes[0], list(result.assignment), device=gm.device)
        record = {"scene": i}
        refined = None
        for name, v in verifiers.items():
            x, masks = descent_features(gm, bu, values, lj, read_levels=v.read_levels,
                                        refine=v.refine_masks)  # fmt: skip
            if v.refine_masks:
                refined = masks
            record[name] = {"score": v.score(x, airplane), "masks": masks}
        if refined is None:  # only the shipped verifier: refine its descents' masks here
            _, refined = descent_features(gm, bu, values, lj, refine=True)
        record["iou"] = torch.stack([mask_iou(refined, t[None].expand_as(refined))
                                     for t in planes]).amax(0)  # fmt: skip
        record["refined"] = refined
        record["image"] = scene.image
        out.append(record)
    return out


def choose(record: dict, name: str, temperature: float | None) -> int:
    """The index of the descent the rule picks (argmax when ``temperature`` is None)."""
    score = record[name]["score"].double()
    if temperature is None:
        return int(score.argmax())
    return int(expected_iou(record[name]["masks"], torch.softmax(score / temperature, 0)).argmax())


def row(records: list[dict], picks: list[int]) -> dict:
    ious = [float(r["iou"][j]) for r, j in zip(records, picks, strict=True)]
    return {"hit@0.5": statistics.mean(float(v >= 0.5) for v in ious),
            "hit@0.3": statistics.mean(float(v >= 0.3) for v in ious),
            "iou": statistics.mean(ious)}  # fmt: skip


def rule_name(temperature: float | None) -> str:
    return "argmax" if temperature is None else f"consensus_{temperature:g}"


@torch.no_grad()
def end_to_end(records: list[dict], verifiers: dict, chosen: dict, split: str,
               top_k: int) -> dict:  # fmt: skip
    """The chosen rules through ``verified_map`` and ``refine_mask`` (one thread)."""
    gm, _ = learned_model(smoke=False, path=None)
    scenes = Scenes(max(r["scene"] for r in records) + 1, seed=split_seed(split))
    out = {}
    for name, temperature in chosen.items():
        verifier = verifiers[name].with_consensus(temperature)
        ious = []
        for r in tqdm(records, desc=f"end to end: {name}", leave=False):
            scene = scenes[r["scene"]]
            planes = torch.stack([t.mask for t in scene.instances
                                  if t.category == "airplane" and t.mask.any()])  # fmt: skip
            bu = hidden_bu(gm, scene.image)
            found = verified_map(gm, bu, category="airplane", verifier=verifier, top_k=top_k)
            mask = refine_mask(gm, found, bu, scene.image)
            ious.append(float(mask_iou(mask.expand_as(planes), planes).max()))
        out[f"{name}_{rule_name(temperature)}"] = {
            "hit@0.5": statistics.mean(float(v >= 0.5) for v in ious),
            "hit@0.3": statistics.mean(float(v >= 0.3) for v in ious),
            "iou": statistics.mean(ious)}  # fmt: skip
    return out


def figure(records: list[dict], name: str, temperature: float, path: Path) -> None:
    """Up to four scenes where consensus changed the choice: the scene, the argmax's refined
    mask and consensus's, with their IoU."""
    changed = [r for r in records if choose(r, name, None) != choose(r, name, temperature)][:4]
    rows = []
    for r in changed:
        a, c = choose(r, name, None), choose(r, name, temperature)
        rows.append([(r["image"].permute(1, 2, 0).clamp(0, 1), f"scene {r['scene']}"),
                     (r["refined"][a], f"argmax (IoU {float(r['iou'][a]):.2f})"),
                     (r["refined"][c], f"consensus τ={temperature:g} "
                                       f"(IoU {float(r['iou'][c]):.2f})")])  # fmt: skip
    if rows:
        panel_figure(rows, path)


@torch.no_grad()
def timing(n: int, out: Path, top_k: int | None = None) -> None:
    """Seconds of one verified pass and its ``refine_mask`` with the shipped verifier and (if
    the package has it) the shipped refined one, interleaved on the same ``n`` test scenes
    (medians and their ratio: a shared machine's load cancels)."""
    gm, _ = learned_model(smoke=False, path=None)
    scenes = Scenes(n, seed=split_seed("test"))
    rules = {"shipped": DescentVerifier.shipped(), "crf": DescentVerifier.shipped(refined=True)}
    rules = {name: v for name, v in rules.items() if v is not None}
    seconds = {name: [] for name in rules}
    for i in tqdm(range(n), desc="timing"):
        bu = hidden_bu(gm, scenes[i].image)
        for name, verifier in rules.items():
            t = time.perf_counter()
            found = verified_map(gm, bu, category="airplane", verifier=verifier, top_k=top_k)
            refine_mask(gm, found, bu, scenes[i].image)
            seconds[name].append(time.perf_counter() - t)
    medians = {name: statistics.median(v) for name, v in seconds.items()}
    record = {"machine": machine(), "threads": 1, "scenes": n, "top_k": top_k or "the verifiers'",
              "median_seconds": medians,
              "rules": {name: repr(v) for name, v in rules.items()}}  # fmt: skip
    if "crf" in medians:
        record["ratio_crf_to_shipped"] = medians["crf"] / medians["shipped"]
    atomic_write_json(out, record)
    print(record)


def ship(crf_path: Path | None, chosen_file: Path) -> None:
    """The CRF verifier with validation's τ, as the package's refined verifier."""
    if crf_path is None or not chosen_file.is_file():
        raise SystemExit("--ship needs --crf-verifier and a validation run's choice of τ")
    chosen = json.loads(chosen_file.read_text())
    if chosen.get("crf_verifier") != crf_path.name:
        raise SystemExit(f"{chosen_file} chose τ for {chosen.get('crf_verifier')}, not "
                         f"{crf_path.name}")  # fmt: skip
    verifier = _verifiers(crf_path)["crf"].with_consensus(chosen["chosen"]["crf"])
    target = Path(pyro_backpass.__file__).parent / "weights" / REFINED_VERIFIER_FILE
    verifier.save(target)
    print(f"wrote {target}: {verifier}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument(
        "--crf-verifier",
        type=Path,
        default=None,
        help="a verifier fitted on CRF-refined masks (fit_verifier.py --refine)",
    )
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--ship", action="store_true",
                        help="write --crf-verifier with validation's τ to the package")  # fmt: skip
    parser.add_argument("--end-to-end", action=argparse.BooleanOptionalAction, default=True,
                        help="test: re-measure the chosen rules through verified_map")  # fmt: skip
    parser.add_argument("--time", type=int, default=0, metavar="N",
                        help="only time the shipped verifiers on N test scenes")  # fmt: skip
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.scenes < 1 or args.workers < 1:
        parser.error("--scenes and --workers must be >= 1")
    torch.set_num_threads(1)
    if args.smoke:
        args.scenes, args.top_k, args.workers = 2, 4, 1
    out = args.out or RESULTS / f"verified_consensus_{args.split}.json"
    if args.ship:
        ship(args.crf_verifier, out.with_name("verified_consensus_validation.json"))
        return
    verifiers = _verifiers(args.crf_verifier)
    if args.time:
        timing(args.time, out.with_name("verified_consensus_time.json"),
               top_k=args.top_k if args.smoke else None)  # fmt: skip
        return
    start = time.perf_counter()
    records = records_in_workers(
        _scene_records, args.scenes, args.workers,
        lambda p, first: (args.split, p, args.crf_verifier, args.top_k, first))  # fmt: skip
    rows = {}
    for name in verifiers:
        for t in (None, *TEMPERATURES):
            rows[f"{name}_{rule_name(t)}"] = row(records, [choose(r, name, t) for r in records])
    bound = row(records, [int(r["iou"].argmax()) for r in records])
    workers = min(args.workers, args.scenes)
    result = {"machine": machine(), "threads": 1, "workers": workers, "split": args.split,
              "scenes": len(records), "top_k": args.top_k, "smoke": args.smoke,
              "verifiers": {k: repr(v) for k, v in verifiers.items()},
              "crf_verifier": None if args.crf_verifier is None else args.crf_verifier.name,
              "rows": rows, "best_of_k": bound}  # fmt: skip
    if args.split == "validation":

        def key(name: str, t: float | None) -> tuple[float, float]:
            r = rows[f"{name}_{rule_name(t)}"]
            return r["hit@0.5"], r["iou"]

        result["chosen"] = {n: max((None, *TEMPERATURES), key=lambda t, n=n: key(n, t))
                            for n in verifiers}  # fmt: skip
    else:
        chosen_file = out.with_name("verified_consensus_validation.json")
        if not chosen_file.is_file():
            raise SystemExit(f"run --split validation first ({chosen_file} holds the choice of τ)")
        chosen = json.loads(chosen_file.read_text())["chosen"]
        result["chosen_on_validation"] = chosen
        if args.end_to_end:
            result["end_to_end"] = end_to_end(records, verifiers, chosen, args.split, args.top_k)
        name = "crf" if "crf" in verifiers else "shipped"
        if chosen.get(name) is not None:
            figure(records, name, chosen[name], out.with_suffix(".png"))
    result["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(out, result)
    for name, r in rows.items():
        print(f"{name:28s} {r}")
    print("best_of_k", bound)
    print({k: v for k, v in result.items() if k in ("chosen", "chosen_on_validation",
                                                     "end_to_end")})  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
