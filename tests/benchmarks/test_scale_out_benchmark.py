"""benchmarks/scale_out.py: the stand-in parser writes records of the parse schema (fast, in the
default run); the --smoke run of the whole benchmark (parse-folder subprocesses) is slow."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pyro_backpass import GenerativeModel

BENCH = Path(__file__).parents[2] / "benchmarks" / "scale_out.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_scale_out", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_stand_in_parser_writes_the_parse_schema():
    gm = GenerativeModel.default()
    images = [torch.rand(3, 64, 64), torch.rand(3, 30, 90)]  # any size: resized to the input
    records = _module().greedy_stand_in(gm, images, ["a.png", "b.png"])
    assert [r["image_id"] for r in records] == ["a.png", "b.png"]
    assert records[1]["size"] == [30, 90]
    for r in records:
        (inst,) = r["instances"]
        assert inst["category"] in gm.categories and len(inst["box"]) == 4
        h, w = inst["segmentation"]["size"]
        assert (
            sum(inst["segmentation"]["counts"]) == h * w
        )  # an uncompressed COCO RLE covers the image


@pytest.mark.slow  # parse-folder subprocesses: ~30 s
def test_scale_out_benchmark_smoke(tmp_path):
    out = tmp_path / "scale_out.json"
    _module().main(["--smoke", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["smoke"] and result["parser"].startswith("stand-in")
    assert [(r["processes"], r["batch"]) for r in result["rows"]] == [(1, 1), (1, 8)]
    assert all(r["images_per_s"] > 0 for r in result["rows"])
