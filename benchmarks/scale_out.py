"""Throughput of ``pyro-backpass parse-folder`` for 1 and 2 processes (torchrun, gloo) and loader
batches of 1, 8 and 32 images; writes ``benchmarks/results/scale_out.json``.

Two parsers: ``--parser scene``, the real one (``parse_scenes`` + ``parse_record``: each
loader batch parsed together, every step's backward pass batched across its images; each
image's parse that of ``parse_scene``), and ``--parser stand-in`` (default),
:func:`greedy_stand_in`: it resizes each loader batch
to the model's input, runs the backbone and ONE greedy backward pass (``greedy_map``, category
free) on the shipped model for the whole batch, and writes a record of the parse schema (the MAP
object's category, log-joint as score, box and an uncompressed COCO RLE of its mask) — cheap,
batched work that shows what batching buys and where the serial merge starts to show. The
scaling (what the processes share: the file list, barriers and the merge) is the same for both.

Images: held-out rendered scenes written as PNG files. The machine is shared (2 cores): ratios
within one run are what to read, and the 2-process rows compete for the same 2 cores (with each
other's loader workers and other jobs). With ``--parser scene`` the run also profiles
``parse_scenes`` on 8 of the scenes, one image per call against all 8 in one call
(:func:`batching_profile`): where the time goes, and so what batching can save on a CPU.

    python benchmarks/scale_out.py                      # stand-in -> results/scale_out.json
    python benchmarks/scale_out.py --parser scene --images 32 --repeats 2 \
        --out benchmarks/results/scale_out_scene.json
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))
from common import RESULTS, machine  # noqa: E402

from pyro_backpass import GenerativeModel, Scenes, greedy_map, parse_scenes  # noqa: E402
from pyro_backpass.cli import merge_parts  # noqa: E402
from pyro_backpass.data import split_seed  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.learning import PRESETS  # noqa: E402


@torch.no_grad()
def greedy_stand_in(gm, images, image_ids):
    """One batched greedy backward pass per loader batch, as records of the parse schema."""
    size = tuple(gm.backbone.image_size)  # (S, S): the model's input
    x = torch.stack(
        [
            F.interpolate(im[None], size=size, mode="bilinear", align_corners=False)[0]
            for im in images
        ]
    )  # (B, 3, S, S)
    bu = {k: v for k, v in gm.backbone(x).items() if k in gm.hidden_levels}
    result = greedy_map(gm, bu)
    cats = result.assignment["category"].reshape(len(images), -1).argmax(dim=-1)  # (B,)
    records = []
    for b, (image, image_id) in enumerate(zip(images, image_ids, strict=True)):
        mask = result.mask[b].cpu()  # (S, S) bool
        ys, xs = mask.nonzero(as_tuple=True)
        box = ([int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                int(ys.max() - ys.min() + 1)] if ys.numel() else [0, 0, 0, 0])  # fmt: skip
        flat = mask.T.reshape(-1).numpy().astype(np.int8)  # column-major, as COCO
        edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
        counts = np.diff(np.concatenate([[0], edges])).tolist()
        records.append({
            "image_id": image_id, "size": list(image.shape[-2:]),
            "stop_reason": "stand-in: one greedy pass", "threshold": None,
            "instances": [{"category": gm.categories[int(cats[b])],
                           "score": round(float(result.log_joint[b]), 3), "box": box,
                           "segmentation": {"size": list(size), "counts": counts}}],
        })  # fmt: skip
    return records


def _write_images(folder: Path, n: int) -> None:
    scenes = Scenes(n, seed=split_seed("test", 0))
    for i in range(n):
        pixels = (scenes[i].image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"scene_{i:05d}.png")


def _run(folder: Path, out: Path, *, processes: int, batch: int, parser: str) -> dict:
    cli = ["-m", "pyro_backpass.cli", "parse-folder", str(folder), "--out", str(out),
           "--batch", str(batch), "--workers", "1", "--threads", "1", "--device", "cpu",
           "--parser", parser, "--no-progress"]  # fmt: skip
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={processes}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(launcher + cli, env=env, capture_output=True, text=True,
                          cwd=HERE.parents[1], timeout=3600)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def batching_profile(n: int = 8, *, max_objects: int = 4) -> dict:
    """cProfile of ``parse_scenes`` on ``n`` test scenes (``max_objects`` steps each, one
    thread): one image per call, then all ``n`` in one call. Per image: wall and CPU seconds,
    Python function calls, and the profiled time inside torch's operators (``torch.*`` builtins
    and tensor methods: the kernels) against the rest (the interpreter: our code and torch's
    Python wrappers). Batching removes per-call interpreter work; the kernels' work per image
    stays, so on a CPU the gain is bounded by the interpreter's share."""
    torch.set_num_threads(1)
    gm = GenerativeModel.default()
    scenes = Scenes(n, seed=split_seed("test", 0))
    images = [scenes[i].image for i in range(n)]
    parse_scenes(gm, images[:1], max_objects=1)  # warm-up
    out = {"images": n, "max_objects": max_objects}
    for name, calls in (("one_per_call", [[im] for im in images]), (f"batch_{n}", [images])):
        prof = cProfile.Profile()
        wall, cpu = time.perf_counter(), time.process_time()
        prof.enable()
        counts = [
            len(p.instances)
            for batch in calls
            for p in parse_scenes(gm, batch, max_objects=max_objects)
        ]
        prof.disable()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        stats = pstats.Stats(
            prof
        ).stats  # (file, line, name) -> (cc, nc, tottime, cumtime, callers)
        total = sum(v[2] for v in stats.values())
        kernels = sum(v[2] for (file, _, fn), v in stats.items()
                      if file == "~" and ("torch." in fn or "TensorBase" in fn))  # fmt: skip
        top = sorted(((v[2], fn) for (file, _, fn), v in stats.items() if file == "~"),
                     reverse=True)[:5]  # fmt: skip
        out[name] = {
            "instances_per_image": statistics.mean(counts),
            "wall_s_per_image": round(wall / n, 3), "cpu_s_per_image": round(cpu / n, 3),
            "python_calls_per_image": round(sum(v[1] for v in stats.values()) / n),
            "profiled_s_per_image": round(total / n, 3),
            "torch_operator_s_per_image": round(kernels / n, 3),
            "interpreter_s_per_image": round((total - kernels) / n, 3),
            "top_operators_s_per_image": {fn: round(t / n, 3) for t, fn in top},
        }  # fmt: skip
    return out


def merge_rate(lines: int, tmp: Path) -> float:
    """Lines per second of the rank-0 merge (the serial part of a sharded run): ``lines``
    records of the stand-in's size in 4 parts, merged by :func:`merge_parts`."""
    gm = GenerativeModel.default()
    records = greedy_stand_in(gm, [torch.rand(3, 64, 64) for _ in range(8)], [""] * 8)
    out = tmp / "merge.jsonl"
    for r in range(4):
        out.with_name(f"merge.jsonl.part{r}of4").write_text("".join(
            json.dumps({**records[i % 8], "image_id": f"{i:08d}"}) + "\n"
            for i in range(r, lines, 4)))  # fmt: skip
    start = time.perf_counter()
    merge_parts(out)
    return lines / (time.perf_counter() - start)


def training_costs(gm, config) -> dict:
    """What data-parallel training moves and holds, from the model's shapes and a preset:
    bytes all-reduced per SGD step (DDP: one level's kernels), per E-step (templates, tables),
    and what one rank holds per object (the targets F_td of every level) and per E-step chunk
    (φ of all K components for ``batch_size`` objects)."""
    f32 = 4
    levels = {}
    for name in gm.hidden_levels:
        step = gm.steps[name]
        elements = math.prod(step.out.shape)  # C·H·W of the level
        params = step.weight.numel() + (step.bias.numel() if step.kind != "template" else 0)
        levels[name] = {
            "kind": step.kind,
            "allreduce_bytes_per_sgd_step": params * f32 if step.kind != "template" else 0,
            "allreduce_bytes_per_e_step": (params if step.kind == "template" else 0) * f32
            + gm.priors[f"gamma_{name}"].probs.numel() * f32,
            "target_bytes_per_object": elements * f32,
            "phi_chunk_bytes": config.em.batch_size * step.num_components * elements * f32,
        }  # fmt: skip
    n = len(config.categories) * config.objects_per_category
    per_object = sum(v["target_bytes_per_object"] for v in levels.values())
    return {
        "preset": "default", "objects": n, "sgd_batch": config.em.batch_size,
        "levels": levels,
        "max_allreduce_bytes_per_sgd_step": max(v["allreduce_bytes_per_sgd_step"]
                                                for v in levels.values()),
        "target_bytes_per_object": per_object,
        "targets_bytes_one_process": per_object * n,
        "max_phi_chunk_bytes": max(v["phi_chunk_bytes"] for v in levels.values()),
    }  # fmt: skip


def train_equality(tmp: Path) -> dict:
    """``pyro-backpass train --preset smoke`` in one process and under ``torchrun`` with two
    (gloo): the largest parameter difference relative to the parameter's largest magnitude,
    per checkpoint, and each run's wall time (start-up included: smoke sizes measure
    correctness, not speed)."""
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = ["-m", "pyro_backpass.cli", "train", "--preset", "smoke", "--threads", "1",
           "--no-progress"]  # fmt: skip
    seconds = {}
    for name, launcher in (("one", [sys.executable]),
                           ("two", [sys.executable, "-m", "torch.distributed.run",
                                    "--standalone", "--nproc_per_node=2"])):  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(launcher + cli + ["--out", str(tmp / name)], env=env,
                              capture_output=True, text=True, cwd=HERE.parents[1])  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        seconds[name] = round(time.perf_counter() - start, 1)
    worst = {}
    for stage in ("observation", "hard_em", "model"):
        a, b = (load_file(tmp / run / f"{stage}.safetensors") for run in ("one", "two"))
        worst[stage] = max(
            float((a[k] - b[k]).double().abs().max() / a[k].double().abs().max().clamp_min(1e-12))
            for k in a if a[k].is_floating_point()
        )  # fmt: skip
    return {"preset": "smoke", "max_relative_difference": worst, "wall_seconds": seconds}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--parser", choices=["stand-in", "scene"], default="stand-in")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each setting (median)")
    ap.add_argument("--smoke", action="store_true", help="8 images, 1 process, batches 1 and 8")
    ap.add_argument("--no-profile", action="store_true", help="skip batching_profile (scene)")
    ap.add_argument("--out", type=Path, default=RESULTS / "scale_out.json")
    ap.add_argument("--only-train", action="store_true",
                    help="only the training comparison, into the --out file")  # fmt: skip
    args = ap.parse_args(argv)
    if args.only_train:
        result = json.loads(args.out.read_text())
        with tempfile.TemporaryDirectory() as tmp:
            result["training_equality"] = train_equality(Path(tmp))
        atomic_write_json(args.out, result)
        return result
    n = 8 if args.smoke else args.images
    repeats = 1 if args.smoke else args.repeats
    grid = [(1, 1), (1, 8)] if args.smoke else [(p, b) for p in (1, 2) for b in (1, 8, 32)]
    parser = f"{HERE}:greedy_stand_in" if args.parser == "stand-in" else "scene"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        _write_images(folder, n)
        runs: dict[tuple[int, int], list[dict]] = {key: [] for key in grid}
        load = [os.getloadavg()[0]]
        for repeat in range(repeats):  # interleaved, so drifting load hits every setting
            for processes, batch in grid:
                out = Path(tmp) / f"p{processes}b{batch}r{repeat}.jsonl"
                s = _run(folder, out, processes=processes, batch=batch, parser=parser)
                if s["images"] != n or s["errors"]:
                    raise RuntimeError(f"expected {n} clean lines, got {s}")
                runs[(processes, batch)].append(s)
                print(f"| {processes} | {batch} | {s['images_per_s']:.2f} |", flush=True)
        load.append(os.getloadavg()[0])
        for (processes, batch), got in runs.items():
            rates = sorted(s["images_per_s"] for s in got)
            rows.append({
                "processes": processes, "batch": batch, "images": n, "runs": len(got),
                "images_per_s": statistics.median(rates), "images_per_s_all": rates,
                "cpu_ms_per_image": round(1000 * statistics.median(
                    s["cpu_seconds"] for s in got) / n, 1),
            })  # fmt: skip
        merge_lines_per_s = merge_rate(2_000 if args.smoke else 50_000, Path(tmp))
        profile = None
        if args.parser == "scene" and not args.no_profile:
            profile = batching_profile(4 if args.smoke else 8, max_objects=2 if args.smoke else 4)
        equality = None if args.smoke else train_equality(Path(tmp))
    base = {r["batch"]: r["images_per_s"] for r in rows if r["processes"] == 1}
    for r in rows:
        r["speedup_vs_1_process"] = round(r["images_per_s"] / base[r["batch"]], 3)
    result = {
        "parser": ("stand-in: one batched greedy backward pass per image on the shipped model "
                   "(not parse_scene)") if args.parser == "stand-in" else (
                   "parse_scenes: each loader batch parsed together, every step's backward pass "
                   "batched across the batch's images (each image's parse that of parse_scene)"),
        "machine": machine(), "threads_per_process": 1, "loader_workers_per_process": 1,
        "machine_note": "2 logical CPUs shared with other jobs: the 2-process rows compete for "
                        "the same 2 cores (each process also has a loader worker), so they "
                        "bound what sharding gives here rather than measure it",
        "smoke": args.smoke, "rows": rows,
        "note": "images_per_s: median over runs of images / seconds from the first batch to "
                "the last rank's barrier (no start-up, no model load; the merge is after it). "
                "cpu_ms_per_image: the parsing processes' CPU time per image (loader workers "
                "aside), less sensitive than wall time to other jobs on the shared machine",
        "load_average_1min_before_after": [round(x, 2) for x in load],
        "merge_lines_per_s": round(merge_lines_per_s),
        "training": training_costs(GenerativeModel.default(), PRESETS["default"]),
        "training_equality": equality,
    }  # fmt: skip
    if profile is not None:
        result["batching_profile"] = profile
    atomic_write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
