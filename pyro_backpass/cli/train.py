"""``pyro-backpass train``: fit a generative model of the shipped backbone's activations.

Renders the data, fits the observation model on cluttered scenes, then the top-down model by
hard EM on single objects, writing an atomic checkpoint after each stage; ``--resume`` continues
from the last completed stage (:func:`pyro_backpass.learning.train.train_model`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from pyro_backpass.cli.device import resolve_device
from pyro_backpass.learning.train import PRESETS, train_model

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="fit a generative model (observation model, then hard EM)",
                       description=__doc__)  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default")
    p.add_argument("--categories", nargs="+", default=None, help="default: the preset's")
    p.add_argument("--backbone", choices=["default", "compositional"], default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", action="store_true", help="continue from the last stage")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="only cpu is supported for training")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if resolve_device(args.device).type != "cpu":
        raise SystemExit("train runs on CPU (the data live in CPU memory)")
    torch.set_num_threads(args.threads)
    config = PRESETS[args.preset]
    overrides = {
        key: value
        for key, value in (("categories", args.categories), ("backbone", args.backbone),
                           ("seed", args.seed))
        if value is not None
    }  # fmt: skip
    if "categories" in overrides:
        overrides["categories"] = tuple(overrides["categories"])
    config = replace(config, **overrides)
    try:
        gm = train_model(config, out_dir=args.out, resume=args.resume,
                         progress=not args.no_progress)  # fmt: skip
    except (ValueError, FileExistsError) as err:
        raise SystemExit(f"train: {err}") from None
    summary = {"model": str(args.out / "model.safetensors"), "levels": list(gm.hidden_levels)}
    print(json.dumps(summary))
