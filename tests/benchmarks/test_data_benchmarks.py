"""Smoke runs of the data benchmarks (the full runs write benchmarks/results/)."""

import importlib.util
import json
from pathlib import Path

from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_render_grid_smoke(tmp_path):
    out = _load("render_grid").main(["--smoke", "--size", "32", "--out", str(tmp_path / "g.png")])
    with Image.open(out) as img:
        assert img.size[0] > 100 and img.size[1] > 100


def test_image_size_smoke(tmp_path):
    out = tmp_path / "size.json"
    result = _load("image_size").main(["--smoke", "--sizes", "32", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"][0]["size"] == 32 == result["rows"][0]["size"]
    assert 0.0 <= saved["rows"][0]["tiny_cnn_heldout_accuracy"] <= 1.0
    assert saved["rows"][0]["object_ms"] > 0
