"""The model's learned mask readout against the threshold rule, on single objects (issue #9's
IoU), and the readouts compared on validation objects.

The rule reads one level (``conv1_1``'s F̂, largest channel at or above ``mask_threshold``); a
:class:`~pyro_backpass.model.MaskReadout` reads F̂ of ``conv1_1``, ``pool1`` and ``conv2_1``
(never the input's activations). ``pyro-backpass train`` fits one as its last step (a small
net, 16 hidden channels, on 200 training objects per category and the objects of 150 training
scenes). Both masks are measured on the
test objects of ``benchmarks/learning.py`` (same seeds, category given, default and scene render
scales): the same passes, only the mask differs.

``--compare`` also refits readouts of the model's F̂ — the logistic 5×5 filter and the net, on
training objects alone or with the objects of 150 training scenes (each read from the pass with
the top level clamped to it) — and reports each one's IoU on validation objects and on the
objects of 30 validation scenes (where the choice of the shipped one was made; the test objects
are not used for it).

``--variants KEY…`` picks the readouts refitted (default: those four; also a 32-channel net,
and nets that read the image level's F̂ too — the model's reconstruction of the input, still
never the input itself).

``--refit`` first fits the model's readout again as ``pyro-backpass train``'s last step does
(:func:`~pyro_backpass.learning.train_mask_readout`, the default preset's settings; with
``--readout-input`` one that also reads the input's activations) and, with ``--save PATH``,
writes the model with it: how a model trained before that step gets one.

Writes ``benchmarks/results/mask_readout.json``. One thread. ``--smoke``: a tiny model trained in
seconds, few objects.

Usage: ``python benchmarks/mask_readout.py [--smoke] [--model PATH] [--compare] [--refit
[--save PATH]]``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, learned_model, machine  # noqa: E402

from pyro_backpass import Scenes, fit_mask_readout, greedy_map  # noqa: E402
from pyro_backpass.data import OBJECT_SCALE, SCENE_SCALE, split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.learning import (  # noqa: E402
    PRESETS,
    mask_iou,
    render_object_set,
    train_mask_readout,
)


def objects(gm, split: str, n: int, *, scale=None):
    """``n`` rendered objects per category of ``split``: images, masks, labels (the training
    command's own renderer, so ``train`` objects are the ones its readout step uses)."""
    scales = (OBJECT_SCALE if scale is None else scale,)
    return render_object_set(tuple(gm.categories), n, seed=split_seed(split),
                             backbone=gm.backbone, scales=scales)  # fmt: skip


@torch.no_grad()
def test_ious(gm, images, masks, labels, *, batch: int = 64) -> dict[str, float]:
    """Mean mask IoU of the readout and of the rule on the same passes (category given): the
    pass runs with the readout detached (its mask is the rule's), the readout reads its F̂."""
    readout, got = gm.mask_readout, {"readout": [], "rule": []}
    gm.attach_mask_readout(None)
    try:
        for start in range(0, images.shape[0], batch):
            sl = slice(start, start + batch)
            bu = {k: v for k, v in gm.backbone(images[sl]).items() if k in gm.hidden_levels}
            r = greedy_map(gm, bu, category=labels[sl])
            got["readout"].append(mask_iou(readout(r.td, bu), masks[sl]))
            got["rule"].append(mask_iou(r.mask, masks[sl]))
    finally:
        gm.attach_mask_readout(readout)
    out = {k: torch.cat(v) for k, v in got.items()}
    return {k: float(v.mean()) for k, v in out.items()} | {
        f"{k}_per_category": {c: float(v[labels == i].mean()) for i, c in enumerate(gm.categories)}
        for k, v in out.items()
    }


#: --compare: key → (name, hidden, training objects per category, training scenes, levels read
#: (None: the default ones)); ``net16_scenes`` is the shipped recipe (TrainConfig's defaults).
#: ``--variants`` picks among them (default: the first four).
WITH_IMAGE = ("image", "conv1_1", "pool1", "conv2_1")
VARIANTS = {
    "logistic": ("logistic 5x5, 40 objects per category", 0, 40, 0, None),
    "logistic_scenes": ("logistic 5x5, 40 objects per category + 150 scenes", 0, 40, 150, None),
    "net16": ("net 16, 200 objects per category", 16, 200, 0, None),
    "net16_scenes": ("net 16, 200 objects per category + 150 scenes", 16, 200, 150, None),
    "net32_scenes": ("net 32, 200 objects per category + 150 scenes", 32, 200, 150, None),
    "net16_image_scenes": ("net 16 reading the image level's F̂ too, 200 objects per category "
                           "+ 150 scenes", 16, 200, 150, WITH_IMAGE),
    "net32_image_scenes": ("net 32 reading the image level's F̂ too, 200 objects per category "
                           "+ 150 scenes", 32, 200, 150, WITH_IMAGE),
    "net16_input_scenes": ("net 16 reading the input's activations too (reads_input), 200 "
                           "objects per category + 150 scenes", 16, 200, 150, None, True),
}  # fmt: skip


def compare(gm, *, smoke: bool, variants=tuple(VARIANTS)[:4]) -> dict[str, dict]:
    """Refit readouts of ``gm``'s F̂ (a copy; the model keeps its own) on training objects (and
    the objects of training scenes, top level clamped) and report their IoU on validation
    objects and on the objects of 30 validation scenes (top level clamped; these choose the
    threshold together with the objects)."""
    import copy

    val = objects(gm, "validation", 2 if smoke else 20)
    val_scenes = list(Scenes(1 if smoke else 30, seed=split_seed("validation")))
    out = {}
    for key in variants:
        name, hidden, n, n_scenes, levels, *reads_input = VARIANTS[key]
        reads_input = bool(reads_input and reads_input[0])
        levels = None if levels is None else [lv for lv in levels if lv in gm.hidden_levels]
        n, n_scenes = (min(n, 3), min(n_scenes, 1)) if smoke else (n, n_scenes)
        work = copy.deepcopy(gm)
        t = time.perf_counter()
        scenes = list(Scenes(n_scenes, seed=split_seed("train"))) if n_scenes else []
        _, report = fit_mask_readout(
            work, work.backbone, objects(gm, "train", n), val, scenes=scenes,
            validation_scenes=val_scenes, hidden=min(hidden, 2) if smoke else hidden,
            epochs=2 if smoke else 30, levels=levels, reads_input=reads_input,
        )  # fmt: skip
        out[name] = report | {"hidden": hidden, "train_per_category": n, "train_scenes": n_scenes,
                              "levels": list(levels or work.mask_readout.config()["levels"]),
                              "reads_input": reads_input,
                              "seconds": round(time.perf_counter() - t, 1)}  # fmt: skip
        print(name, json.dumps(out[name]), flush=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny model and few objects")
    p.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    p.add_argument("--compare", action="store_true", help="refit readouts, validation IoU")
    p.add_argument("--refit", action="store_true", help="fit the readout as training does")
    p.add_argument("--save", type=Path, default=None, help="with --refit: write the model")
    p.add_argument("--readout-input", action=argparse.BooleanOptionalAction, default=None,
                   help="with --refit: the readout also reads the input's activations (default: "
                        "the preset's, which does since issue #10 shipped it)")  # fmt: skip
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), default=None,
                   help="with --compare: the readouts refitted (default: first four)")  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS / "mask_readout.json")
    args = p.parse_args(argv)
    if args.save is not None and not args.refit:
        p.error("--save writes a refitted readout: pass --refit too")
    if args.readout_input is not None and not args.refit:
        p.error("--readout-input sets the refitted readout: pass --refit too")
    if args.variants is not None and not args.compare:
        p.error("--variants picks the readouts that --compare refits: pass --compare too")
    torch.set_num_threads(1)
    start = time.perf_counter()
    gm, name = learned_model(smoke=args.smoke, path=args.model)
    refit = None
    if args.refit:
        t = time.perf_counter()
        config = PRESETS["smoke" if args.smoke else "default"]
        if args.readout_input is not None:
            config = dataclasses.replace(config, readout_input=args.readout_input)
        refit = train_mask_readout(gm, gm.backbone, config, progress=True)
        refit["seconds"] = round(time.perf_counter() - t, 1)
        if args.save is not None:
            gm.save(args.save)
    if gm.mask_readout is None:
        raise SystemExit(f"{name} has no mask readout (train it with `pyro-backpass train`)")
    n_test = 2 if args.smoke else 40
    result = {
        "machine": machine(),
        "threads": 1,
        "model": name,
        "readout": gm.mask_readout.config(),
        "test_objects_per_category": n_test,
        "refit": refit,
    }
    for label, scale in (("default_scale", None), ("scene_scale", SCENE_SCALE)):
        result[f"test_{label}"] = test_ious(gm, *objects(gm, "test", n_test, scale=scale))
    if args.compare:
        variants = args.variants or tuple(VARIANTS)[:4]
        result["validation_compare"] = compare(gm, smoke=args.smoke, variants=variants)
    result["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("test", "valid", "ref"))},
                     indent=1))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
