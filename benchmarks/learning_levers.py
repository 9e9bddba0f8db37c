"""One learning lever at a time against the shipped configuration, on validation objects.

Each variant is the ``default`` training preset with one option changed; it is trained with
``train_model`` (one thread) and scored by the validation mask IoU at its own best mask
threshold (what the train command's last stage measures). The test split is not touched.
The baseline is the shipped run itself (``benchmarks/results/train_default_log.json``), which
used the same code and configuration.

Writes ``benchmarks/results/learning_levers/<variant>.json``; run variants in parallel
processes, one per core. ``--table`` prints all of them.

Usage: ``python benchmarks/learning_levers.py --variant NAME | --table | --smoke``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine  # noqa: E402

from pyro_backpass.files import atomic_write_json  # noqa: E402
from pyro_backpass.learning import PRESETS, TrainConfig, train_model  # noqa: E402

OUT = RESULTS / "learning_levers"


def variants(base: TrainConfig) -> dict[str, TrainConfig]:
    return {
        "inputs_targets": replace(base, em=replace(base.em, inputs="targets")),
        "iterations_6": replace(base, em=replace(base.em, iterations=6)),
        "components_top_50": replace(base, components_top=50),
        "epochs_8": replace(base, em=replace(base.em, epochs=8)),
        "epochs_2": replace(base, em=replace(base.em, epochs=2)),
    }


def run(name: str, config: TrainConfig, out: Path) -> dict:
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train_model(config, out_dir=tmp, progress=False)
        log = json.loads((Path(tmp) / "log.json").read_text())
    ious = log["mask_threshold_iou"]
    best = max(ious, key=ious.get)
    result = {
        "machine": machine(),
        "threads": 1,
        "variant": name,
        "config": config.to_json(),
        "validation_mask_iou": ious[best],
        "mask_multiplier": float(best),
        "final_rms_error": log["em"][-1]["rms_error"],
        "seconds": round(time.perf_counter() - start, 1),
    }
    atomic_write_json(out / f"{name}.json", result)
    return result


def table(out: Path) -> str:
    base = json.loads((RESULTS / "train_default_log.json").read_text())["mask_threshold_iou"]
    lines = ["| variant (one change from the default preset) | validation mask IoU |", "|---|---|"]
    lines.append(f"| shipped default (baseline) | {max(base.values()):.3f} |")
    for path in sorted(out.glob("*.json")):
        r = json.loads(path.read_text())
        lines.append(f"| {r['variant']} | {r['validation_mask_iou']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=sorted(variants(PRESETS["default"])))
    parser.add_argument("--smoke", action="store_true", help="one variant of the smoke preset")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.table:
        print(table(args.out))
        return
    if args.smoke:
        name = "iterations_6"
        print(run(name, variants(PRESETS["smoke"])[name], args.out)["validation_mask_iou"])
        return
    if args.variant is None:
        parser.error("give --variant, --smoke or --table")
    print(json.dumps(run(args.variant, variants(PRESETS["default"])[args.variant], args.out)))


if __name__ == "__main__":
    main()
