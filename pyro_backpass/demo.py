"""``pyro-backpass demo``: the core on the built-in default model, with figures."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="sample, run the backward pass and plot (writes figures)")
    p.add_argument("--out", default="figures/demo", help="output folder for figures")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, for tests")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    raise SystemExit("demo: not implemented yet")
