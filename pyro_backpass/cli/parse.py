"""``pyro-backpass parse IMAGE... --out DIR``: parse photographs or rendered scenes with the
shipped model; per image a figure and a JSON record (``parse_record``: masks in COCO RLE)."""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")  # writes files; never opens a window

import matplotlib.pyplot as plt  # noqa: E402

from pyro_backpass.cli.arguments import (  # noqa: E402
    DEVICE_HELP,
    add_command,
    any_device,
    input_file,
    output_dir,
    positive_float,
    positive_int,
)
from pyro_backpass.files import atomic_write, atomic_write_json  # noqa: E402
from pyro_backpass.model.generative_model import GenerativeModel  # noqa: E402
from pyro_backpass.parsing import Query, parse_record, parse_scene  # noqa: E402
from pyro_backpass.viz.parse_plots import plot_instances  # noqa: E402

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "parse", help="parse images into object instances (figures + JSON)",
                    doc=__doc__)  # fmt: skip
    p.add_argument("images", nargs="+", type=input_file,
                   help="image files (any size, PIL-readable)")  # fmt: skip
    p.add_argument("--out", type=output_dir, required=True, help="output folder")
    p.add_argument("--model", type=input_file, default=None,
                   help="a saved model (default: the shipped one)")  # fmt: skip
    p.add_argument("--max-objects", type=positive_int, default=None,
                   help="a cap on instances (default: until the stopping rule)")  # fmt: skip
    p.add_argument("--beam", type=positive_int, default=1,
                   help="parse paths kept (1: greedy; 4 about doubled recall on the test "
                        "scenes at ~5x the time, see the README)")  # fmt: skip
    p.add_argument("--scales", type=positive_float, nargs="+", default=[1.0], help="scan scales")
    p.add_argument("--category", default=None, help="attend to one category (default: all)")
    p.add_argument("--device", type=any_device, default="auto", help=DEVICE_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from PIL import Image

    device = args.device
    gm = GenerativeModel.default() if args.model is None else GenerativeModel.load(args.model)
    gm = gm.to(device)
    if gm.backbone is not None:
        gm.backbone.to(device)
    query = Query(category=args.category) if args.category else None
    for path in args.images:
        try:
            im = Image.open(path)
            im.load()
        except OSError as err:  # missing, unreadable, or not an image PIL knows
            raise ValueError(f"{path}: not a readable image ({err})") from None
        with im:
            start = time.perf_counter()
            parse = parse_scene(gm, im, max_objects=args.max_objects, query=query,
                                beam=args.beam, scales=tuple(args.scales))  # fmt: skip
        seconds = time.perf_counter() - start
        record = parse_record(parse, image_id=path.name)
        atomic_write_json(args.out / f"{path.stem}.json", record)
        fig, _ = plot_instances(
            parse.image, [i.reconstruction for i in parse.instances],
            [i.mask for i in parse.instances],
            [f"{i.category}\n(score {i.score:.2f}, LLR {i.llr:.0f})" for i in parse.instances],
            suptitle=f"{path.name}: {len(parse.instances)} instances, stop: {parse.stop_reason}",
        )  # fmt: skip
        target = args.out / f"{path.stem}.png"
        atomic_write(target, lambda tmp, f=fig: f.savefig(tmp, dpi=110, bbox_inches="tight",
                                                          format="png"))  # fmt: skip
        plt.close(fig)
        cats = ", ".join(i.category for i in parse.instances) or "none"
        print(f"{path.name}: {cats} (stop: {parse.stop_reason}, {seconds:.1f} s) -> "
              f"{target}, {args.out / f'{path.stem}.json'}")  # fmt: skip
