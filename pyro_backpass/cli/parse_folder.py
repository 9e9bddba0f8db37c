"""``pyro-backpass parse-folder DIR --out OUT.jsonl``: parse every image under a folder, one JSON
line per image (the schema of :func:`pyro_backpass.parsing.parse_record`); and
``pyro-backpass merge-parts OUT.jsonl``.

Images are read by a ``DataLoader`` with worker processes (:class:`~pyro_backpass.data.ImageFiles`:
any size and mode; a file that cannot be read becomes a line with ``"stop_reason": "error"`` and
the reason, as does an image whose parse raises; the run goes on). The images of a loader
batch are parsed together (:func:`~pyro_backpass.parsing.parse_scenes`: each step's backward
pass runs once for all the images still parsing); a batch that raises is parsed again image by
image, so only the bad image gets an error line. Each line is appended, flushed and fsync'd
before the next, so a killed run leaves whole lines only (and at most a partial last one,
which ``--resume`` cuts before skipping every image id already written).

Under ``torchrun --nproc_per_node=P -m pyro_backpass.cli parse-folder ...`` rank ``r`` takes
every P-th image of the sorted list from the r-th on and appends to its own part file
(``OUT.jsonl.part<r>of<P>``); after a barrier rank 0 merges the parts into ``OUT.jsonl``, sorted
by image id, so the file equals the single-process run's. ``merge-parts OUT.jsonl.part*`` does
that merge by hand (after a rank died, say). The backend follows ``--device``: NCCL for CUDA,
gloo for CPU.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pyro_backpass.cli.arguments import (
    DEVICE_HELP,
    add_command,
    any_device,
    input_dir,
    input_file,
    non_negative_int,
    positive_int,
)
from pyro_backpass.cli.launch import launched_world
from pyro_backpass.data.image_files import ImageFiles, ImageItem, list_image_ids
from pyro_backpass.files import JsonLinesAppender, atomic_write, read_json_lines, whole_lines
from pyro_backpass.learning.distributed import SINGLE_PROCESS, World
from pyro_backpass.model import GenerativeModel

__all__ = ["ParseBatch", "add_parser", "merge_parts", "parse_image_folder", "parse_images", "run"]

# (model, images [(3, H, W)] on the device, their ids) -> one record per image, in order.
ParseBatch = Callable[[GenerativeModel, list[torch.Tensor], list[str]], list[dict[str, Any]]]


def parse_images(
    gm: GenerativeModel, images: list[torch.Tensor], image_ids: list[str]
) -> list[dict[str, Any]]:
    """The parser of ``parse-folder``: ``parse_record(parse, image_id=...)`` of
    ``parse_scenes(gm, images)``, each image's parse what ``parse_scene`` gives for it alone,
    with every step's backward pass batched across the images still parsing."""
    from pyro_backpass.parsing import parse_record, parse_scenes

    parses = parse_scenes(gm, images)
    return [parse_record(p, image_id=i) for p, i in zip(parses, image_ids, strict=True)]


def _load_parser(spec: str) -> ParseBatch:
    """``scene`` (the real one, :func:`parse_images`), or ``MODULE:FUNCTION`` or
    ``PATH.py:FUNCTION`` (tests, benchmarks: a stand-in of the same signature)."""
    if spec == "scene":
        parsing = importlib.import_module("pyro_backpass.parsing")
        missing = [n for n in ("parse_scenes", "parse_record") if not hasattr(parsing, n)]
        if missing:
            raise SystemExit(
                f"parse-folder: pyro_backpass.parsing has no {missing} in this version "
                "(issue #11); --parser MODULE:FUNCTION runs a stand-in"
            )
        return parse_images
    module, _, name = spec.rpartition(":")
    try:
        if module.endswith(".py"):  # a script's function (benchmarks/ is not a package)
            loader = importlib.util.spec_from_file_location(Path(module).stem, module)
            loaded = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(loaded)
            return getattr(loaded, name)
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError, OSError) as err:
        raise SystemExit(f"--parser: cannot import {spec!r} ({err})") from None


def error_record(image_id: str, reason: str) -> dict[str, Any]:
    """The line of an image with no parse: the schema's keys, no instances, and the reason."""
    return {"image_id": image_id, "size": None, "stop_reason": "error", "threshold": None,
            "criterion": None, "instances": [], "error": reason}  # fmt: skip


def _parse_safely(parse: ParseBatch, gm, items: list[ImageItem], device) -> list[dict]:
    """Records of readable ``items``; a batch that raises is retried image by image, so only
    the image that fails gets an error line."""
    if not items:
        return []
    try:
        records = parse(gm, [it.image.to(device) for it in items], [it.image_id for it in items])
        if len(records) != len(items):
            raise ValueError(f"the parser returned {len(records)} records for {len(items)} images")
        for record, it in zip(records, items, strict=True):
            if record.get("image_id") != it.image_id:
                raise ValueError(f"a record for {record.get('image_id')!r}, not {it.image_id!r}")
            json.dumps(record)  # a record that cannot be written is this image's error
        return records
    except Exception as err:  # one bad image must not end a run of thousands
        if len(items) > 1:
            return [r for it in items for r in _parse_safely(parse, gm, [it], device)]
        return [error_record(items[0].image_id, f"parse failed: {type(err).__name__}: {err}")]


def part_path(out: Path, rank: int, size: int) -> Path:
    return out.with_name(f"{out.name}.part{rank}of{size}")


def _parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.part*of*"))


def merge_parts(out: str | Path) -> int:
    """Merge ``out`` and its part files into ``out`` (atomically), one line per image id (the
    first written wins), sorted by id; the parts are then removed. Returns the line count."""
    out = Path(out)
    parts = _parts(out)
    lines: dict[str, str] = {}  # image id -> its line as written (no re-serialising)
    for path in [out, *parts]:
        for line in whole_lines(path):
            lines.setdefault(json.loads(line)["image_id"], line)

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines[k] + "\n" for k in sorted(lines))

    atomic_write(out, write)
    for path in parts:
        path.unlink()
    return len(lines)


def parse_image_folder(
    root: str | Path,
    out: str | Path,
    *,
    gm: GenerativeModel,
    parse: ParseBatch = parse_images,
    batch: int = 8,
    workers: int = 2,
    device: torch.device | None = None,
    resume: bool = False,
    world: World = SINGLE_PROCESS,
    progress: bool = True,
) -> dict[str, Any]:
    """Parse this rank's share of the images under ``root`` into ``out`` (module docstring);
    every rank must call it. Returns a summary (on every rank).

    :param parse: images → records (:data:`ParseBatch`); the default is the scene parser.
    :param device: where the images go (the model's device); CPU by default.
    """
    root, out = Path(root), Path(out)
    device = torch.device("cpu") if device is None else device
    ids = list_image_ids(root) if root.is_dir() else []
    if not ids:
        raise ValueError(f"{root} holds no image files")
    if not resume and (out.exists() or _parts(out)):
        raise FileExistsError(f"{out} (or its parts) exists; pass --resume or another --out")
    done = {r["image_id"] for path in [out, *_parts(out)] for r in read_json_lines(path)}
    world.barrier()  # every rank has read what is done before any rank writes
    target = part_path(out, world.rank, world.size) if world.distributed else out
    read_json_lines(target, repair=True)  # cut a partial last line left by a killed run
    mine = [i for i in ids[world.rank :: world.size] if i not in done]
    loader = DataLoader(ImageFiles(root, ids=mine), batch_size=batch, num_workers=workers,
                        collate_fn=list)  # fmt: skip
    start, cpu_start, errors = time.perf_counter(), time.process_time(), 0
    bar = tqdm(total=len(mine), unit="img", desc=f"parse (rank 0 of {world.size})",
               disable=not (progress and world.is_main))  # fmt: skip
    with JsonLinesAppender(target) as lines:
        for items in loader:
            parsed = iter(_parse_safely(parse, gm, [it for it in items if it.image is not None],
                                        device))  # fmt: skip
            for it in items:  # in file order
                record = next(parsed) if it.image is not None else error_record(
                    it.image_id, it.error or "unreadable")  # fmt: skip
                errors += record.get("stop_reason") == "error"
                lines.write(record)
            bar.update(len(items))
    bar.close()
    cpu = time.process_time() - cpu_start  # this process's CPU time (loader workers aside)
    counts = world.all_reduce_sum(torch.tensor([len(mine), errors, cpu], dtype=torch.float64))
    world.barrier()  # every part is complete
    seconds = time.perf_counter() - start
    if world.is_main and (world.distributed or _parts(out)):
        merge_parts(out)
    world.barrier()  # the merged file is on disk before any rank returns
    n = int(counts[0])
    return {"out": str(out), "images": n, "errors": int(counts[1]), "skipped": len(done),
            "processes": world.size, "seconds": round(seconds, 3),
            "images_per_s": round(n / seconds, 3) if seconds > 0 else None,
            "cpu_seconds": round(float(counts[2]), 3)}  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "parse-folder", help="parse every image under a folder into JSON lines",
                    doc=__doc__)  # fmt: skip
    p.add_argument("folder", type=input_dir, help="images, searched recursively")
    p.add_argument("--out", type=Path, required=True,
                   help="the JSON-lines file; must not exist unless --resume")  # fmt: skip
    p.add_argument("--batch", type=positive_int, default=8,
                   help="images per loader batch, parsed together (batched passes)")  # fmt: skip
    p.add_argument("--workers", type=non_negative_int, default=2,
                   help="DataLoader worker processes (0: read in the main process)")  # fmt: skip
    p.add_argument("--device", type=any_device, default="auto", help=DEVICE_HELP)
    p.add_argument("--model", type=input_file, default=None, help="default: the shipped model")
    p.add_argument("--resume", action="store_true", help="skip images already in the output")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads per process (default: torch's)")  # fmt: skip
    p.add_argument("--parser", default="scene",
                   help="'scene' (parse_scenes), or MODULE:FUNCTION or PATH.py:FUNCTION, a "
                        "stand-in of the same signature for tests and benchmarks")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    m = add_command(sub, "merge-parts", help="merge parse-folder's part files into one",
                    doc="Merge OUT.jsonl.part<r>of<P> files (and OUT.jsonl if it exists) into "
                        "OUT.jsonl, sorted by image id, and remove the parts.")  # fmt: skip
    m.add_argument("parts", type=input_file, nargs="+",
                   help="the part files, e.g. out.jsonl.part*")  # fmt: skip
    m.set_defaults(func=run_merge)


def run(args: argparse.Namespace) -> None:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    parse = _load_parser(args.parser)
    device = args.device
    # A barrier can wait for the slowest rank's whole share: a long timeout.
    with launched_world(device, timeout_s=7 * 24 * 3600) as world:
        if device.type == "cuda" and world.distributed:
            device = torch.device("cuda", torch.cuda.current_device())
        gm = GenerativeModel.default() if args.model is None else GenerativeModel.load(args.model)
        gm = gm.to(device)
        summary = parse_image_folder(
            args.folder, args.out, gm=gm, parse=parse, batch=args.batch,
            workers=args.workers, device=device, resume=args.resume, world=world,
            progress=not args.no_progress,
        )  # fmt: skip
        if world.is_main:
            print(json.dumps(summary))


def run_merge(args: argparse.Namespace) -> None:
    outs = {re.sub(r"\.part\d+of\d+$", "", str(p)) for p in args.parts}
    if len(outs) != 1 or any(str(p) in outs for p in args.parts):
        raise ValueError(f"give the part files of one output (OUT.jsonl.part<r>of<P>), got "
                         f"{[str(p) for p in args.parts]}")  # fmt: skip
    out = Path(outs.pop())
    print(json.dumps({"out": str(out), "images": merge_parts(out)}))
