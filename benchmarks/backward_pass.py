"""The backward pass at the default model's size, against one backbone forward pass.

The generative model has the default backbone's levels (``Backbone.default()``: 64 px,
``image`` → ``conv1_1`` → ``pool1`` → … → ``pool4`` → ``category``, its 5 categories) and random
kernels (``GenerativeModel.random`` on the backbone's config); ``bu`` is the backbone's own
activations of rendered scenes (``make_scene``), and the forward pass that made them is the
yardstick. Every time is the median of ``--repeats`` calls after a warm-up, and every ratio is
``greedy_map`` / forward pass measured in the same process, their calls interleaved (the
machine is shared while measuring and its load drifts: compare ratios, not absolute times).

Settings (K = 5 components on every level unless said otherwise, batch 32, one thread):

* ``base``: category unknown (enumerated with the top level's γ, δ) — the issue's target;
* ``threads2``: the same on 2 threads (forward pass on 2 threads too);
* ``category_given``; ``top_k15``: the 15 best top-level hypotheses each completed;
* ``k_top_<K>``: K ∈ {5, 50, 500} on the top level (pool4) only;
* ``batch_<B>``: B ∈ {8, 32, 128}, time per image;
* ``compiled``: ``base`` with ``PYRO_BACKPASS_COMPILE=1`` (the opt-in compiled scores), in a
  fresh process whose inductor cache was filled by another; the cold compile (empty cache) and
  the cached one are the first call's time minus the median;

and the peak RSS of a fresh process (torch imported, model and activations loaded, one
``greedy_map`` call) for K_top = 500 at batch 32 and for each batch size.

Writes ``benchmarks/results/backward_pass.json``; ``--table`` prints it as the README's
markdown; ``--smoke`` runs a tiny preset in seconds. ``--device auto`` uses CUDA when present
(the same library code; RSS is then replaced by the peak CUDA memory).

Usage: ``python benchmarks/backward_pass.py [--smoke] [--device auto|cpu|cuda] [--out PATH]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, interleaved_median_times, machine  # noqa: E402

from pyro_backpass import Backbone, GenerativeModel, greedy_map, make_scene  # noqa: E402
from pyro_backpass.cli import resolve_device  # noqa: E402
from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.huge_pages import huge_pages_requested, kernel_huge_pages  # noqa: E402

PRESETS = {
    # K on every level, batch, top-level Ks, batches, repeats, top_k of the top_k row, and
    # whether to measure the compiled scores (a minute of cold compile: not in the smoke run)
    # and whether to also measure the shipped trained model (GenerativeModel.default()).
    "full": dict(
        k=5,
        batch=32,
        k_tops=(5, 50, 500),
        batches=(8, 32, 128),
        repeats=5,
        top_k=15,
        compiled=True,
        shipped=True,
    ),
    "smoke": dict(
        k=2,
        batch=2,
        k_tops=(2, 4),
        batches=(1, 2),
        repeats=1,
        top_k=3,
        compiled=False,
        shipped=False,
    ),
}


def scenes(batch: int, device: torch.device) -> torch.Tensor:
    """``(B, 3, 64, 64)`` rendered scenes: two targets and one distractor each."""
    images = [make_scene(targets=("airplane", "car"), distractors=1, seed=i).image
              for i in range(batch)]  # fmt: skip
    return torch.stack(images).to(device)


def build(k: int, k_top: int, device: torch.device, seed: int = 0):
    """The backbone and a random generative model on its levels (K, and K_top on the top)."""
    bb = Backbone.default().eval().to(device)
    names = [s.name for s in bb.levels[:-1]]
    ks = {n: (k_top if n == names[-1] else k) for n in names}
    gm = GenerativeModel.random(bb.cfg, num_components=ks, num_categories=len(bb.categories),
                                image_size=bb.image_size, seed=seed).to(device)  # fmt: skip
    return bb, gm


def activations(bb, images: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        acts = bb(images)
    return {name: acts[name] for name in acts}


def measure(bb, gm, images, *, repeats: int, device, threads: int, **kw) -> dict:
    """greedy_map and the forward pass on the same batch, same process, same threads."""
    torch.set_num_threads(threads)
    bu = activations(bb, images)

    def forward():
        with torch.inference_mode():
            bb(images)

    # Interleaved (forward, greedy, forward, …): the machine is shared, its load drifts.
    t = interleaved_median_times({"forward": forward, "greedy": lambda: greedy_map(gm, bu, **kw)},
                                 repeats=repeats, device=device)  # fmt: skip
    t_fwd, t_greedy = t["forward"], t["greedy"]
    b = images.shape[0]
    return {"batch": b, "threads": threads, "forward_s": t_fwd, "greedy_s": t_greedy,
            "ratio": t_greedy / t_fwd, "greedy_ms_per_image": 1000 * t_greedy / b}  # fmt: skip


def peak_memory(gm, bu, device: torch.device) -> dict:
    """Peak memory of one ``greedy_map`` call in a fresh process (model and bu loaded from
    files, so building them does not count); on CUDA the peak allocated memory instead."""
    with tempfile.TemporaryDirectory() as tmp:
        model, data = Path(tmp) / "gm.safetensors", Path(tmp) / "bu.pt"
        gm.save(model)
        torch.save({n: v.cpu() for n, v in bu.items()}, data)
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(model), str(data), "--device", device.type],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(model: str, data: str, device: torch.device) -> None:
    """The fresh process of :func:`peak_memory`: prints its peak RSS (MB) before/after."""
    import resource

    torch.set_num_threads(1)
    gm = GenerativeModel.load(model).to(device)
    bu = {n: v.to(device) for n, v in torch.load(data).items()}
    before = _status_mb("VmRSS")
    try:  # reset the high-water mark, so the call's own peak is seen (Linux)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    greedy_map(gm, bu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    call_peak = _status_mb("VmHWM") or peak
    row = {"peak_rss_mb": peak, "call_peak_rss_mb": call_peak, "rss_before_call_mb": before}
    if device.type == "cuda":
        row["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(row))


def fresh_process_rows(gm, images, device: torch.device, *, repeats: int, child: str,
                       envs) -> dict:  # fmt: skip
    """One JSON row per fresh process running ``--<child>`` on ``gm`` and ``images`` (written
    to a temporary folder): ``envs(tmp)`` maps each row's name to the environment variables it
    sets, in order."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        model, data = Path(tmp) / "gm.safetensors", Path(tmp) / "images.pt"
        gm.save(model)
        torch.save(images.cpu(), data)
        for name, extra in envs(Path(tmp)).items():
            cmd = [sys.executable, __file__, f"--{child}", str(model), str(data),
                   "--device", device.type, "--repeats", str(repeats)]  # fmt: skip
            env = dict(os.environ, **extra)
            run_ = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            out[name] = json.loads(run_.stdout.strip().splitlines()[-1])
    return out


def _child_inputs(model: str, data: str, device: torch.device):
    """A fresh process's backbone, model and images (one thread)."""
    torch.set_num_threads(1)
    bb = Backbone.default().eval().to(device)
    gm = GenerativeModel.load(model).to(device)
    return bb, gm, torch.load(data).to(device)


def compiled_rows(gm, images, device: torch.device, *, repeats: int) -> dict:
    """``PYRO_BACKPASS_COMPILE=1`` (the opt-in compiled scores) in fresh processes sharing an
    empty inductor cache: the first process pays the cold compile, the second finds it cached.
    Each reports its first call (compile included), the median after it and the forward pass."""

    def envs(tmp: Path) -> dict:
        env = {"PYRO_BACKPASS_COMPILE": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor")}
        return {"cold": env, "cached": env}

    return fresh_process_rows(gm, images, device, repeats=repeats, child="compiled-child",
                              envs=envs)  # fmt: skip


def compiled_child(model: str, data: str, device: torch.device, repeats: int) -> None:
    """The fresh process of :func:`compiled_rows`: prints one JSON row."""
    bb, gm, images = _child_inputs(model, data, device)
    bu = activations(bb, images)
    t = time.perf_counter()
    first = greedy_map(gm, bu)
    first_s = time.perf_counter() - t
    eager = dict(os.environ)
    os.environ.pop("PYRO_BACKPASS_COMPILE")
    plain = greedy_map(gm, bu)
    os.environ.update(eager)
    same = all(torch.equal(first.assignment[s], plain.assignment[s]) for s in plain.assignment)
    rel = ((first.log_joint - plain.log_joint).abs() / plain.log_joint.abs()).max().item()
    row = measure(bb, gm, images, repeats=repeats, device=device, threads=1)
    row |= {"first_call_s": first_s, "compile_s": first_s - row["greedy_s"],
            "assignments_equal_eager": same, "log_joint_max_rel_diff": rel}  # fmt: skip
    print(json.dumps(row))


def no_huge_pages_row(gm, images, device: torch.device, *, repeats: int) -> dict:
    """``base`` in a fresh process with ``THP_MEM_ALLOC_ENABLE=0`` (PyTorch's default, 4 kB pages
    for large tensors; ``pyro_backpass.huge_pages``), and the page faults of one call in each."""
    envs = {"no_huge_pages": {"THP_MEM_ALLOC_ENABLE": "0"},
            "huge_pages": {"THP_MEM_ALLOC_ENABLE": "1"}}  # fmt: skip
    return fresh_process_rows(gm, images, device, repeats=repeats, child="plain-child",
                              envs=lambda tmp: envs)  # fmt: skip


def plain_child(model: str, data: str, device: torch.device, repeats: int) -> None:
    """The fresh process of :func:`no_huge_pages_row`: one JSON row, with the minor page faults
    of one ``greedy_map`` call after the warm-up (the kernel's counter)."""
    import resource

    bb, gm, images = _child_inputs(model, data, device)
    row = measure(bb, gm, images, repeats=repeats, device=device, threads=1)
    bu = activations(bb, images)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    greedy_map(gm, bu)
    row["page_faults_per_call"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    row["huge_pages_requested"] = huge_pages_requested()
    print(json.dumps(row))


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status in MB (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run(preset: dict, device: torch.device) -> dict:
    k, batch, repeats = preset["k"], preset["batch"], preset["repeats"]
    bb, gm = build(k, k, device)
    images = scenes(max(preset["batches"] + (batch,)), device)
    x = images[:batch]
    rows = {}

    rows["base"] = measure(bb, gm, x, repeats=repeats, device=device, threads=1)
    print(f"base             ratio {rows['base']['ratio']:7.1f}x", flush=True)
    compiled = compiled_rows(gm, x, device, repeats=repeats) if preset["compiled"] else {}
    if compiled:
        rows["compiled"] = compiled["cached"]
        print(f"compiled         ratio {rows['compiled']['ratio']:7.1f}x, cold compile "
              f"{compiled['cold']['compile_s']:.0f} s, cached "
              f"{compiled['cached']['compile_s']:.0f} s", flush=True)  # fmt: skip
    if device.type == "cpu":
        pages = no_huge_pages_row(gm, x, device, repeats=repeats)
        rows["fresh_process"], rows["no_huge_pages"] = pages["huge_pages"], pages["no_huge_pages"]
        print(
            f"no huge pages    ratio {rows['no_huge_pages']['ratio']:7.1f}x "
            f"({rows['no_huge_pages']['page_faults_per_call']} page faults per call, "
            f"{rows['fresh_process']['page_faults_per_call']} with them)",
            flush=True,
        )
    rows["threads2"] = measure(bb, gm, x, repeats=repeats, device=device, threads=2)
    rows["category_given"] = measure(bb, gm, x, repeats=repeats, device=device, threads=1,
                                     category=0)  # fmt: skip
    rows["top_k15"] = measure(bb, gm, x, repeats=repeats, device=device, threads=1,
                              top_k=preset["top_k"])  # fmt: skip
    rows["top_k15"]["top_k"] = preset["top_k"]
    if preset["shipped"]:  # learned kernels (K = 20 on the top level, 5 below), same batch
        shipped = GenerativeModel.default().to(device)
        rows["shipped_model"] = measure(bb, shipped, x, repeats=repeats, device=device, threads=1)
    for name in ("threads2", "category_given", "top_k15", "shipped_model"):
        if name in rows:
            print(f"{name:16s} ratio {rows[name]['ratio']:7.1f}x", flush=True)
    k_top = {}
    for kt in preset["k_tops"]:
        bb_k, gm_k = (bb, gm) if kt == k else build(k, kt, device)
        r = measure(bb_k, gm_k, x, repeats=repeats, device=device, threads=1)
        if kt == preset["k_tops"][-1]:
            r |= peak_memory(gm_k, activations(bb_k, x), device)
        k_top[str(kt)] = r
        print(f"K_top={kt:<10d} ratio {r['ratio']:7.1f}x  greedy {r['greedy_s']:.3f} s", flush=True)
        del gm_k
    kts = [str(v) for v in preset["k_tops"]]
    growth = k_top[kts[-1]]["greedy_s"] / k_top[kts[-2]]["greedy_s"]
    batches = {}
    for b in preset["batches"]:
        r = measure(bb, gm, images[:b], repeats=repeats, device=device, threads=1)
        mem = peak_memory(gm, activations(bb, images[:b]), device)
        mem["call_mb_per_image"] = (mem["call_peak_rss_mb"] - mem["rss_before_call_mb"]) / b
        batches[str(b)] = r | mem
        print(f"batch={b:<10d} {r['greedy_ms_per_image']:.1f} ms/image, "
              f"{mem['call_mb_per_image']:.1f} MB/image", flush=True)  # fmt: skip
    torch.set_num_threads(1)
    return {
        "machine": machine(),
        "device": str(device),
        "huge_pages": {"requested": huge_pages_requested(), "kernel": kernel_huge_pages()},
        "model": f"Backbone.default() levels, random kernels, K={k} per level, "
        f"{len(gm.categories)} categories, bu = backbone activations of rendered scenes",
        "settings": rows,
        "k_top": k_top,
        "k_top_growth": {"from": int(kts[-2]), "to": int(kts[-1]), "time_ratio": growth},
        "compile": {
            name: {key: r[key] for key in ("first_call_s", "compile_s")}
            for name, r in compiled.items()
        },  # fmt: skip
        "batches": batches,
    }


def run_shipped(preset: dict, device: torch.device) -> dict:
    """The ``--shipped-only`` run: the ``base`` row and the shipped model's row alone, in one
    process on the same scenes (for re-measuring the shipped model after it changes without
    re-running every other row)."""
    k, batch, repeats = preset["k"], preset["batch"], preset["repeats"]
    bb, gm = build(k, k, device)
    x = scenes(batch, device)
    rows = {"base": measure(bb, gm, x, repeats=repeats, device=device, threads=1)}
    shipped = GenerativeModel.default().to(device)
    rows["shipped_model"] = measure(bb, shipped, x, repeats=repeats, device=device, threads=1)
    for name, r in rows.items():
        print(f"{name:16s} ratio {r['ratio']:7.1f}x", flush=True)
    return {
        "machine": machine(),
        "device": str(device),
        "model": f"Backbone.default() levels, random kernels, K={k} per level (base); "
        "GenerativeModel.default() (shipped_model); bu = backbone activations of rendered scenes",
        "settings": rows,
    }


def markdown_table(result: dict) -> str:
    """The README's table, from a results JSON."""
    lines = ["| setting | greedy (s) | forward (s) | greedy / forward |", "|---|---|---|---|"]
    labels = {"base": "category unknown (target ≤ 10×)", "threads2": "2 threads",
              "compiled": "category unknown, `PYRO_BACKPASS_COMPILE=1`",
              "fresh_process": "category unknown, a fresh process (huge pages on, the default)",
              "no_huge_pages": "category unknown, a fresh process, `THP_MEM_ALLOC_ENABLE=0`",
              "category_given": "category given", "top_k15": "top_k = 15",
              "shipped_model": "shipped model `GenerativeModel.default()`, K 20 / 5"}  # fmt: skip
    for name, r in result["settings"].items():
        lines.append(f"| {labels.get(name, name)} | {r['greedy_s']:.3f} | {r['forward_s']:.4f} "
                     f"| {r['ratio']:.1f}× |")  # fmt: skip
    if "k_top" not in result:  # a --shipped-only run: its two settings rows
        return "\n".join(lines)
    for kt, r in result["k_top"].items():
        mem = f", peak RSS {r['call_peak_rss_mb']:.0f} MB" if "peak_rss_mb" in r else ""
        lines.append(f"| top-level K = {kt}{mem} | {r['greedy_s']:.3f} | {r['forward_s']:.4f} "
                     f"| {r['ratio']:.1f}× |")  # fmt: skip
    g = result["k_top_growth"]
    growth = f"{g['time_ratio']:.1f}×"
    lines.append(f"| time K = {g['from']} → {g['to']} (target ≤ 10×) | | | {growth} |")
    if result.get("compile"):
        cold, cached = result["compile"]["cold"], result["compile"]["cached"]
        lines.append(f"| compile: cold / inductor cache warm (s) | {cold['compile_s']:.1f} "
                     f"| {cached['compile_s']:.1f} | |")  # fmt: skip
    lines += ["", "| batch | ms / image | call's memory / image (MB) | peak RSS (MB) | "
              "greedy / forward |", "|---|---|---|---|---|"]  # fmt: skip
    for b, r in result["batches"].items():
        lines.append(f"| {b} | {r['greedy_ms_per_image']:.1f} | {r['call_mb_per_image']:.1f} "
                     f"| {r['call_peak_rss_mb']:.0f} | {r['ratio']:.1f}× |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny preset, seconds")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--table", action="store_true", help="print --out's results as markdown")
    p.add_argument("--child", nargs=2, metavar=("MODEL", "BU"), help=argparse.SUPPRESS)
    p.add_argument("--compiled-child", nargs=2, metavar=("MODEL", "IMAGES"), help=argparse.SUPPRESS)
    p.add_argument("--plain-child", nargs=2, metavar=("MODEL", "IMAGES"), help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=5, help=argparse.SUPPRESS)
    p.add_argument(
        "--shipped-only",
        action="store_true",
        help="only the base and shipped-model rows (backward_pass_shipped.json)",
    )
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if args.child:
        child(*args.child, device)
        return
    if args.compiled_child:
        compiled_child(*args.compiled_child, device, args.repeats)
        return
    if args.plain_child:
        plain_child(*args.plain_child, device, args.repeats)
        return
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    out = args.out or RESULTS / f"backward_pass{'_shipped' * args.shipped_only}{suffix}.json"
    if args.shipped_only and not args.table:  # the table: markdown_table's settings rows
        result = run_shipped(PRESETS["smoke" if args.smoke else "full"], device)
        atomic_write_json(out, result)
        print(f"wrote {out}")
        return
    if args.table:
        print(markdown_table(json.loads(out.read_text())))
        return
    result = run(PRESETS["smoke" if args.smoke else "full"], device)
    atomic_write_json(out, result)
    print(markdown_table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
