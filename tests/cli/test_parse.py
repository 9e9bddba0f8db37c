"""`pyro-backpass parse`: figures and one JSON record per image (parse_record's schema)."""

import json

import numpy as np
import pytest
from PIL import Image

from pyro_backpass import make_scene, split_seed
from pyro_backpass.cli import main


@pytest.mark.usefixtures("one_thread")
def test_parse_writes_a_figure_and_a_record_per_image(tmp_path, capsys):
    scene = make_scene(seed=split_seed("test", 5))
    rgb = (scene.image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "scene.png")
    Image.fromarray(rgb[..., 0]).resize((90, 70)).save(tmp_path / "grey.jpg")  # grey, other size
    out = tmp_path / "out"
    main(["parse", str(tmp_path / "scene.png"), str(tmp_path / "grey.jpg"), "--out", str(out),
          "--max-objects", "1", "--device", "cpu"])  # fmt: skip
    for stem, size in (("scene", [64, 64]), ("grey", [70, 90])):
        record = json.loads((out / f"{stem}.json").read_text())
        assert record["size"] == size and record["image_id"].startswith(stem)
        assert len(record["instances"]) <= 1 and record["stop_reason"]
        assert (out / f"{stem}.png").stat().st_size > 1000
    assert "scene.png" in capsys.readouterr().out
