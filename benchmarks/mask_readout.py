"""A learned mask readout of F̂ against the threshold rule, on single objects (issue #9's IoU).

The shipped model's mask is a rule on one level (``conv1_1``'s F̂, largest channel at or above
``mask_threshold``). :func:`~pyro_backpass.fit_mask_readout` fits a logistic 5×5 filter over
F̂ of ``conv1_1``, ``pool1`` and ``conv2_1`` on training objects (their rendered masks), its
threshold on validation objects; both masks are then measured on the test objects of
``benchmarks/learning.py`` (same seeds, category given, default and scene render scales). The
readout reads only F̂ — the backward pass's explanation — never the input's activations.

Writes ``benchmarks/results/mask_readout.json`` (and, with ``--save``, the model with the readout
attached). One thread. ``--smoke``: a tiny model trained in seconds, few objects.

Usage: ``python benchmarks/mask_readout.py [--smoke] [--model PATH] [--train N] [--save PATH]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, learned_model, machine  # noqa: E402

from pyro_backpass import RenderedObjects, fit_mask_readout, greedy_map  # noqa: E402
from pyro_backpass.data import SCENE_SCALE, split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.learning import mask_iou  # noqa: E402


def objects(gm, split: str, n: int, *, scale=None):
    """``n`` rendered objects per category of ``split``: images, masks, labels."""
    images, masks, labels = [], [], []
    for c, cat in enumerate(gm.categories):
        kw = {} if scale is None else {"scale": scale}
        ds = RenderedObjects(cat, n, seed=split_seed(split), **kw)
        for i in range(n):
            image, mask = ds[i]
            images.append(image), masks.append(mask), labels.append(c)
    return torch.stack(images), torch.stack(masks), torch.tensor(labels)


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
            got["readout"].append(mask_iou(readout(r.td), masks[sl]))
            got["rule"].append(mask_iou(r.mask, masks[sl]))
    finally:
        gm.attach_mask_readout(readout)
    out = {k: torch.cat(v) for k, v in got.items()}
    return {k: float(v.mean()) for k, v in out.items()} | {
        f"{k}_per_category": {c: float(v[labels == i].mean()) for i, c in enumerate(gm.categories)}
        for k, v in out.items()
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny model and few objects")
    p.add_argument("--model", type=Path, default=None, help="default: the shipped model")
    p.add_argument("--train", type=int, default=40, help="training objects per category")
    p.add_argument("--save", type=Path, default=None, help="write the model with the readout")
    p.add_argument("--out", type=Path, default=RESULTS / "mask_readout.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    gm, name = learned_model(smoke=args.smoke, path=args.model)
    n_train, n_val, n_test = (3, 2, 2) if args.smoke else (args.train, 20, 40)
    train, val = objects(gm, "train", n_train), objects(gm, "validation", n_val)
    t = time.perf_counter()
    _, report = fit_mask_readout(gm, gm.backbone, train, val)
    fit_s = time.perf_counter() - t
    result = {
        "machine": machine(),
        "threads": 1,
        "model": name,
        "readout": gm.mask_readout.config(),
        "objects_per_category": {"train": n_train, "validation": n_val, "test": n_test},
        "fit": report | {"seconds": round(fit_s, 1)},
    }
    for label, scale in (("default_scale", None), ("scene_scale", SCENE_SCALE)):
        result[f"test_{label}"] = test_ious(gm, *objects(gm, "test", n_test, scale=scale))
    result["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_json(args.out, result)
    if args.save is not None:
        gm.save(args.save)
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("fit", "test"))},
                     indent=1))  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
