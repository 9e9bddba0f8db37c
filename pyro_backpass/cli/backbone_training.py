"""``pyro-backpass train-backbone``: train the built-in SmallVGG on rendered objects.

The training itself is :func:`pyro_backpass.backbone.train.train_backbone`; this module only
turns the command line into a :class:`~pyro_backpass.backbone.train.TrainConfig`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any

import torch

from pyro_backpass.backbone import train as train_module
from pyro_backpass.backbone.train import SMOKE, TrainConfig, train_backbone
from pyro_backpass.cli.arguments import (
    add_command,
    checkpoint_stem,
    cpu_device,
    note,
    positive_float,
    positive_int,
)

__all__ = ["add_parser", "run"]

train_doc = train_module.__doc__ or ""


def parse_cfg(text: str) -> tuple[int | str, ...]:
    items = [s.strip() for s in text.strip("[]()").split(",") if s.strip()]
    try:
        return tuple(s.strip("'\"") if s.strip("'\"") == "M" else int(s) for s in items)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ints and M, e.g. 16,M,32,M; got {text}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = TrainConfig()
    p = add_command(
        sub,
        "train-backbone",
        help="train the built-in SmallVGG backbone on rendered objects (CPU, minutes)",
        doc=train_doc.split("\n\n", 1)[-1],  # the library's account, less its first line
    )
    p.add_argument(
        "--out",
        type=checkpoint_stem,
        default="checkpoints/small_vgg",
        help="checkpoint stem: STEM.safetensors + STEM.json (an existing checkpoint is replaced)",
    )
    p.add_argument(
        "--cfg",
        type=parse_cfg,
        default=",".join(str(v) for v in d.cfg),
        help="conv channels and M (max-pool), comma-separated",
    )
    p.add_argument(
        "--image-size",
        type=positive_int,
        default=d.image_size,
        help="training images are this many pixels square",
    )
    p.add_argument(
        "--categories", nargs="+", default=list(d.categories), help="categories to classify"
    )
    p.add_argument("--n-train", type=positive_int, default=d.n_train, help="objects per category")
    p.add_argument(
        "--n-test", type=positive_int, default=d.n_test, help="held-out objects per category"
    )
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="passes over the data")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help="images per step")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="learning rate")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the data and the weights")
    p.add_argument(
        "--compositional",
        action="store_true",
        help="add Stone et al. (2017)'s compositionality objective (US patent 11,216,727)",
    )
    p.add_argument(
        "--penalty-levels",
        nargs="+",
        default=None,
        help="levels the compositionality objective penalises (default: every conv and pool)",
    )
    p.add_argument(
        "--penalty",
        choices=["relative", "absolute"],
        default=d.penalty,
        help="the compositionality penalty's form",
    )
    p.add_argument(
        "--penalty-weight",
        type=positive_float,
        default=d.penalty_weight,
        help="weight of the compositionality penalty",
    )
    p.add_argument(
        "--n-scenes",
        type=positive_int,
        default=d.n_scenes,
        help="cluttered scenes for the compositional or localisation objective",
    )
    p.add_argument(
        "--localised",
        action="store_true",
        help="add the scene localisation objective: per-cell category labels at the top level "
        "from instance masks, clutter negative (issue #10, lever 3)",
    )
    p.add_argument(
        "--localisation-weight",
        type=positive_float,
        default=d.localisation_weight,
        help="weight of the per-cell multi-label loss",
    )
    p.add_argument(
        "--background-levels",
        nargs="+",
        default=[],
        help="levels where activation off the objects is penalised relative to on them "
        "(with --localised; default: none)",
    )
    p.add_argument(
        "--background-weight",
        type=positive_float,
        default=d.background_weight,
        help="weight of the background penalty",
    )
    p.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    p.add_argument(
        "--device", type=cpu_device, default="cpu", help="only cpu: the data live in CPU memory"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for tests")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    config = TrainConfig(
        cfg=args.cfg,
        image_size=args.image_size,
        categories=tuple(args.categories),
        n_train=args.n_train,
        n_test=args.n_test,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        compositional=args.compositional,
        penalty_levels=None if args.penalty_levels is None else tuple(args.penalty_levels),
        penalty=args.penalty,
        penalty_weight=args.penalty_weight,
        n_scenes=args.n_scenes,
        localised=args.localised,
        localisation_weight=args.localisation_weight,
        background_levels=tuple(args.background_levels),
        background_weight=args.background_weight,
    )
    if args.smoke:
        default = TrainConfig()
        given = [k for k in SMOKE if getattr(config, k) != getattr(default, k)]
        if given:
            note(f"--smoke replaces the {', '.join(given)} given by its own tiny sizes")
        config = replace(config, **SMOKE)
    result = train_backbone(config, progress=not args.no_progress)
    path = result.backbone.save(args.out)
    summary: dict[str, Any] = {
        "checkpoint": str(path),
        "held_out_accuracy": round(result.held_out_accuracy, 4),
        "train_seconds": round(result.train_seconds, 1),
        "render_seconds": round(result.render_seconds, 1),
    }
    print(json.dumps(summary))
