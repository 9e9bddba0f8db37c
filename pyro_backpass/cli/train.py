"""``pyro-backpass train``: fit a generative model of the shipped backbone's activations.

Renders the data, fits the observation model on cluttered scenes, then the top-down model by
hard EM on single objects, writing an atomic checkpoint after each stage; ``--resume`` continues
from the last completed stage (:func:`pyro_backpass.learning.train.train_model`).

Under ``torchrun --nproc_per_node=P -m pyro_backpass.cli train ...`` the work is shared by P
processes (gloo; training runs on CPU): each renders and fits a shard of the data, the stages
all-reduce their statistics and DistributedDataParallel the kernels' gradients; rank 0 alone
writes the checkpoints and prints the summary. Same parameters as one process, up to rounding.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from pyro_backpass.cli.arguments import (
    add_command,
    cpu_device,
    non_negative_int,
    output_dir,
    positive_int,
)
from pyro_backpass.cli.launch import launched_world
from pyro_backpass.learning.train import PRESETS, train_model

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "train", help="fit a generative model (observation model, then hard EM)", doc=__doc__
    )
    p.add_argument(
        "--out",
        type=output_dir,
        required=True,
        help="checkpoint folder (created; must hold no checkpoints unless --resume)",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="sizes of the run (smoke: seconds, for tests)",
    )
    p.add_argument(
        "--categories", nargs="+", default=None, help="categories to model (default: the preset's)"
    )
    p.add_argument(
        "--backbone",
        default=None,
        help="the backbone to model: default, compositional, localised (the shipped ones) or the "
        "checkpoint of a `train-backbone` run (its path; recorded in the model and reattached "
        "from there on load) (default: the preset's)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed (default: the preset's)")
    p.add_argument(
        "--top-level",
        default=None,
        help="the top hidden level, just below the category, e.g. pool3 (default: the "
        "preset's, pool4); the backbone's levels above it are not modelled",
    )
    p.add_argument(
        "--top-offset-radius",
        type=non_negative_int,
        default=None,
        help="δ of the top level: {-r..r}^2 cells (default: the preset's, 2)",
    )
    p.add_argument(
        "--components-top",
        type=positive_int,
        default=None,
        help="K of the top level (default: the preset's, 20)",
    )
    p.add_argument(
        "--components",
        type=positive_int,
        default=None,
        help="K of every level below the top (default: the preset's, 5)",
    )
    p.add_argument(
        "--readout-objects",
        type=non_negative_int,
        default=None,
        help="training objects per category for the mask readout (default: the preset's, 200; "
        "0: no readout, masks by the threshold rule — what runs written before it used)",
    )
    p.add_argument(
        "--readout-hidden",
        type=non_negative_int,
        default=None,
        help="hidden channels of the mask readout (default: the preset's, 16; 0: one logistic "
        "filter)",
    )
    p.add_argument(
        "--readout-input",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether the mask readout also reads the input's activations beside F̂ (default: "
        "the preset's, which does since issue #10 measured it; --no-readout-input: F̂ only, as "
        "the model shipped before)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the last completed stage in --out"
    )
    p.add_argument(
        "--threads", type=positive_int, default=2, help="torch CPU threads (per process)"
    )
    p.add_argument(
        "--device", type=cpu_device, default="cpu", help="only cpu: the data live in CPU memory"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    if args.resume and not (args.out / "config.json").is_file():
        args.command_parser.error(f"--resume: {args.out} holds no run to resume (no config.json)")
    torch.set_num_threads(args.threads)
    config = PRESETS[args.preset]
    overrides = {
        key: value
        for key, value in (("categories", args.categories), ("backbone", args.backbone),
                           ("seed", args.seed), ("top_level", args.top_level),
                           ("top_offset_radius", args.top_offset_radius),
                           ("components_top", args.components_top),
                           ("components", args.components),
                           ("readout_objects_per_category", args.readout_objects),
                           ("readout_hidden", args.readout_hidden),
                           ("readout_input", args.readout_input))
        if value is not None
    }  # fmt: skip
    if "categories" in overrides:
        overrides["categories"] = tuple(overrides["categories"])
    config = replace(config, **overrides)
    with launched_world(torch.device("cpu")) as world:
        gm = train_model(config, out_dir=args.out, resume=args.resume,
                         progress=not args.no_progress, world=world)  # fmt: skip
        if world.is_main:
            summary = {"model": str(args.out / "model.safetensors"),
                       "levels": list(gm.hidden_levels), "processes": world.size}  # fmt: skip
            print(json.dumps(summary))
