"""Peak memory and time of ``greedy_map(..., top_k=k)`` for k in {1, 10, 100, 1000}.

Each k runs in a fresh process with one torch thread; its peak resident set (``ru_maxrss``)
less the resident set just before the call is the call's peak memory. The model is a random
one on the default backbone's configuration (16,M,32,M,64,M,64,M) at 32 px with K = 8 and five
categories, so the top level has 5·8·25 = 1000 hypotheses; 8 images. With ``--repo PATH`` the
same runs use the package at PATH (e.g. a checkout from before the k completions were made a
group at a time), for a before/after row.

Run: ``python benchmarks/top_k_memory.py`` (a minute or two); ``--smoke`` is a seconds-long
run that writes nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine  # noqa: E402

OUT = RESULTS / "top_k_memory.json"

_CHILD = """
import json, resource, sys, time
# A guard for the shared machine: a run past 14 GiB of address space fails instead of swapping.
resource.setrlimit(resource.RLIMIT_AS, (14 * 2**30, resource.RLIM_INFINITY))
sys.path.insert(0, sys.argv[1]) if sys.argv[1] else None
import torch
torch.set_num_threads(1)
from pyro_backpass import GenerativeModel, greedy_map, sample
cfg, size, k_comp, cats, n, top_k = json.loads(sys.argv[2])
gm = GenerativeModel.random(cfg, num_components=k_comp, num_categories=cats, image_size=size)
s = sample(gm, n, observe=True, seed=0)
greedy_map(gm, s.bu)  # warm-up (first-call allocations are not the call's)

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
before = rss()
t = time.perf_counter()
r = greedy_map(gm, s.bu, top_k=top_k)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"top_k": top_k, "seconds": seconds, "rss_before_bytes": before,
                  "peak_rss_bytes": peak, "call_peak_bytes": max(0, peak - before),
                  "map": [int(v) for v in r.assignment["category"]],
                  "log_joint": [round(float(v), 3) for v in r.log_joint]}))
"""


def run(repo: str, setting: list, top_k: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, repo, json.dumps(setting + [top_k])],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        return {"top_k": top_k, "error": (out.stderr.strip().splitlines() or ["killed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="results JSON")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, k in {1, 10}")
    parser.add_argument("--repo", action="append", default=[],
                        help="also run the package at this checkout (label=PATH)")  # fmt: skip
    args = parser.parse_args(argv)

    if args.smoke:
        setting, ks = [[4, "M"], 16, 3, 2, 2], [1, 10]
    else:
        setting, ks = [[16, "M", 32, "M", 64, "M", 64, "M"], 32, 8, 5, 8], [1, 10, 100, 1000]
    runs = {"this": ""} | dict(r.split("=", 1) for r in args.repo)
    rows = []
    for label, repo in runs.items():
        for k in ks:
            row = {"code": label} | run(repo, setting, k)
            print(json.dumps({key: v for key, v in row.items() if key not in ("map", "log_joint")}))
            rows.append(row)
    result = {
        "machine": machine(),
        "threads": 1,
        "model": {
            "cfg": setting[0],
            "image_size": setting[1],
            "K": setting[2],
            "categories": setting[3],
            "images": setting[4],
        },  # fmt: skip
        "rows": rows,
    }
    out = args.out if args.out is not None else (None if args.smoke else OUT)
    if out is not None:
        from pyro_backpass.files import atomic_write_json

        atomic_write_json(out, result)
    return result


if __name__ == "__main__":
    main()
