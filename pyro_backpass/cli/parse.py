"""``pyro-backpass parse IMAGE... --out DIR``: parse photographs or rendered scenes with the
shipped model; per image a figure and a JSON record (``parse_record``: masks in COCO RLE)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # writes files; never opens a window

import matplotlib.pyplot as plt  # noqa: E402

from pyro_backpass.cli.device import resolve_device  # noqa: E402
from pyro_backpass.files import atomic_write, atomic_write_json  # noqa: E402
from pyro_backpass.model.generative_model import GenerativeModel  # noqa: E402
from pyro_backpass.parsing import Query, parse_record, parse_scene  # noqa: E402
from pyro_backpass.viz.parse_plots import plot_instances  # noqa: E402

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("parse", help="parse images into object instances (figures + JSON)")
    p.add_argument("images", nargs="+", type=Path, help="image files (any size, PIL-readable)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--model", type=Path, default=None, help="a saved model (default: shipped)")
    p.add_argument("--max-objects", type=int, default=None, help="a cap on instances")
    p.add_argument("--beam", type=int, default=1, help="parse paths kept (1: greedy)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.0], help="scan scales")
    p.add_argument("--category", default=None, help="attend to one category")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from PIL import Image

    device = resolve_device(args.device)
    gm = GenerativeModel.default() if args.model is None else GenerativeModel.load(args.model)
    gm = gm.to(device)
    if gm.backbone is not None:
        gm.backbone.to(device)
    query = Query(category=args.category) if args.category else None
    for path in args.images:
        if not path.is_file():
            raise SystemExit(f"no such image file: {path}")
        with Image.open(path) as im:
            im.load()
            start = time.perf_counter()
            parse = parse_scene(gm, im, max_objects=args.max_objects, query=query,
                                beam=args.beam, scales=tuple(args.scales))  # fmt: skip
        seconds = time.perf_counter() - start
        record = parse_record(parse, image_id=path.name)
        atomic_write_json(args.out / f"{path.stem}.json", record)
        fig, _ = plot_instances(
            parse.image, [i.reconstruction for i in parse.instances],
            [i.mask for i in parse.instances],
            [f"{i.category} (LLR {i.score:.0f})" for i in parse.instances],
            suptitle=f"{path.name}: {len(parse.instances)} instances, stop: {parse.stop_reason}",
        )  # fmt: skip
        target = args.out / f"{path.stem}.png"
        atomic_write(target, lambda tmp, f=fig: f.savefig(tmp, dpi=110, bbox_inches="tight",
                                                          format="png"))  # fmt: skip
        plt.close(fig)
        cats = ", ".join(i.category for i in parse.instances) or "none"
        print(f"{path.name}: {cats} (stop: {parse.stop_reason}, {seconds:.1f} s) -> "
              f"{target}, {args.out / f'{path.stem}.json'}")  # fmt: skip
