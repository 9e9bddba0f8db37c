"""``pyro-backpass train-backbone``: train the built-in SmallVGG on rendered objects.

The training itself is :func:`pyro_backpass.backbone.train.train_backbone`; this module only
turns the command line into a :class:`~pyro_backpass.backbone.train.TrainConfig`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pyro_backpass.backbone import train as train_module
from pyro_backpass.backbone.train import SMOKE, TrainConfig, train_backbone
from pyro_backpass.cli.device import resolve_device

__all__ = ["add_parser", "run"]

train_doc = train_module.__doc__ or ""


def parse_cfg(text: str) -> tuple[int | str, ...]:
    items = [s.strip() for s in text.strip("[]()").split(",") if s.strip()]
    try:
        return tuple(s.strip("'\"") if s.strip("'\"") == "M" else int(s) for s in items)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cfg: ints and M, e.g. 16,M,32,M; got {text}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = TrainConfig()
    p = sub.add_parser(
        "train-backbone",
        help="train the built-in SmallVGG backbone on rendered objects (CPU, minutes)",
        description=train_doc.split("References:")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--out", default="checkpoints/small_vgg", help="checkpoint stem (.safetensors + .json)"
    )
    p.add_argument("--cfg", type=parse_cfg, default=d.cfg, help="e.g. 16,M,32,M,64,M,64,M")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--categories", nargs="+", default=list(d.categories))
    p.add_argument("--n-train", type=int, default=d.n_train, help="objects per category")
    p.add_argument("--n-test", type=int, default=d.n_test, help="held-out objects per category")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--compositional",
        action="store_true",
        help="add Stone et al. (2017)'s compositionality objective (US patent 11,216,727)",
    )
    p.add_argument(
        "--penalty-levels", nargs="+", default=None, help="default: every conv and pool level"
    )
    p.add_argument("--penalty", choices=["relative", "absolute"], default=d.penalty)
    p.add_argument("--penalty-weight", type=float, default=d.penalty_weight)
    p.add_argument("--n-scenes", type=int, default=d.n_scenes)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="only cpu is supported for training")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for tests")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if resolve_device(args.device).type != "cpu":
        raise SystemExit("train-backbone trains on CPU (the data live in CPU memory)")
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
    )
    if args.smoke:
        config = replace(config, **SMOKE)
    try:
        result = train_backbone(config, progress=not args.no_progress)
    except ValueError as err:
        raise SystemExit(f"train-backbone: {err}") from None
    path = result.backbone.save(Path(args.out))
    summary: dict[str, Any] = {
        "checkpoint": str(path),
        "held_out_accuracy": round(result.held_out_accuracy, 4),
        "train_seconds": round(result.train_seconds, 1),
        "render_seconds": round(result.render_seconds, 1),
    }
    print(json.dumps(summary))
