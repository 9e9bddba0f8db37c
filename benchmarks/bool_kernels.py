"""Why the hot path selects with 0/1 float masks: CPU kernels that touch bool tensors, timed.

On one block of the backward pass's element-wise work (262,144 float32 elements, the block size
``cache_blocks.block_elements`` picks on the development machine), one thread: a float
multiply, a float comparison giving a bool, a bool → float conversion, ``torch.where``,
float × bool, and the two ways of selecting the closed form's branch — the bool one the code
used (``f_on * take + f_off * ~take`` with ``take = score_on >= score_off``) and the float one
it uses now (``take = clamp(sign(score_on − score_off) + 1, max=1)``, then ``f_on * take +
f_off * (1 − take)``), checked to give the same values bit for bit. Every kernel writes into
preallocated outputs, so the rows time kernels, not the allocator. Each time is the median of
``--repeats`` rounds of 50 calls; the ratios to the float multiply are what to read.

Writes ``benchmarks/results/bool_kernels.json``; ``--smoke`` runs a tiny preset.

Usage: ``python benchmarks/bool_kernels.py [--smoke] [--out PATH]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine  # noqa: E402

import pyro_backpass  # noqa: E402, F401  (its huge-page setting, as in the library's own use)
from pyro_backpass.files import atomic_write_json  # noqa: E402


def _time(fn, *, calls: int, repeats: int) -> float:
    """Median over ``repeats`` rounds of the mean time of ``calls`` calls (microseconds)."""
    fn()
    rounds = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(rounds)


def run(*, elements: int, calls: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(elements, generator=gen), torch.randn(elements, generator=gen)
    cond = a >= b
    mask = cond.to(a.dtype)
    # Every kernel writes into preallocated outputs: the rows time the kernels, not the
    # allocator (fresh 1 MB temporaries can cost page faults when glibc trims its heap).
    out, t1, t2 = (torch.empty_like(a) for _ in range(3))
    flag = torch.empty_like(cond)

    def bool_select():
        torch.ge(a, b, out=flag)
        torch.mul(a, flag, out=t1)
        torch.mul(b, torch.logical_not(flag, out=flag), out=t2)
        return torch.add(t1, t2, out=out)

    def float_select():
        take = torch.sub(a, b, out=t2).sign_().add_(1).clamp_max_(1)
        torch.mul(a, take, out=t1)
        torch.mul(b, take.neg_().add_(1), out=t2)
        return torch.add(t1, t2, out=out)

    same = torch.equal(bool_select().clone(), float_select().clone())
    kernels = {
        "float multiply a * b": lambda: torch.mul(a, b, out=out),
        "float maximum": lambda: torch.maximum(a, b, out=out),
        "comparison a >= b (bool out)": lambda: torch.ge(a, b, out=flag),
        "bool -> float conversion": lambda: out.copy_(cond),
        "torch.where(bool, a, b)": lambda: torch.where(cond, a, b, out=out),
        "float * bool": lambda: torch.mul(a, cond, out=out),
        "float * 0/1 float mask": lambda: torch.mul(a, mask, out=out),
        "branch selection, bool (before)": bool_select,
        "branch selection, float mask (now)": float_select,
    }
    times = {name: _time(fn, calls=calls, repeats=repeats) for name, fn in kernels.items()}
    base = times["float multiply a * b"]
    return {
        "machine": machine(),
        "elements": elements,
        "threads": 1,
        "calls_per_round": calls,
        "rounds": repeats,
        "microseconds": times,
        "ratio_to_float_multiply": {name: t / base for name, t in times.items()},
        "float_selection_equals_bool_selection": same,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="a tiny preset, seconds")
    p.add_argument("--out", type=Path, default=RESULTS / "bool_kernels.json")
    args = p.parse_args(argv)
    preset = dict(elements=4096, calls=2, repeats=2) if args.smoke else dict(
        elements=262_144, calls=50, repeats=7
    )  # fmt: skip
    result = run(**preset)
    if not result["float_selection_equals_bool_selection"]:
        raise SystemExit("the float-mask selection differs from the bool one")
    atomic_write_json(args.out, result)
    for name, r in result["ratio_to_float_multiply"].items():
        print(f"{name:40s} {result['microseconds'][name]:9.1f} µs  {r:6.1f}×")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
