"""benchmarks/backbone.py --smoke: runs in seconds and writes its results and figure."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from pyro_backpass.cli import main
from pyro_backpass.data import CATEGORIES

BENCH = Path(__file__).parents[2] / "benchmarks" / "backbone.py"


def test_backbone_benchmark_smoke(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_backbone", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, fig = tmp_path / "backbone.json", tmp_path / "sweep.png"
    stem = tmp_path / "localised"
    main(["train-backbone", "--smoke", "--no-progress", "--out", str(stem), "--localised"])
    capsys.readouterr()
    module.main(["--smoke", "--out", str(out), "--figure", str(fig),
                 "--checkpoint", f"mine={stem}"])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["smoke"] is True and "CPUs" in result["machine"]
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shipped = {"small_vgg", "small_vgg_compositional", "small_vgg_localised"}
    assert set(result["backbones"]) == shipped | {"mine"}
    assert result["backbones"]["mine"]["localisation"]["full_cover"] == 0.25
    assert result["backbones"]["small_vgg"]["localisation"] is None
    for row in result["backbones"].values():
        assert 0 <= row["held_out_accuracy"] <= 1
        assert set(row["images_per_second"]) == {"1_threads", "2_threads"}
        assert min(row["images_per_second"].values()) > 0
        assert row["training"]["train_seconds"] > 0
        change = row["relative_change"]
        assert list(change)[0] == "image" and list(change)[-1] == "pool4"
        # Inside its visible mask a scene shows the object's own pixels, up to antialiased
        # edges: the image-level change must be small, or the masks are misaligned.
        assert change["image"] < 0.15
        energy = row["off_object_energy"]
        assert list(energy)[0] == "conv1_1" and list(energy)[-1] == "pool4"
        assert all(v >= 0 for v in energy.values())
        auc = row["cam_auc"]
        assert set(auc) == {*CATEGORIES, "mean"}
    table = capsys.readouterr().out
    assert table.startswith("| backbone |") and "small_vgg_compositional" in table
