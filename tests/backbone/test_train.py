"""train-backbone smoke runs, and the shipped weights checked on freshly rendered objects."""

from __future__ import annotations

import json
import re

import pytest
import torch

from pyro_backpass.backbone import Backbone
from pyro_backpass.backbone.train import HELD_OUT_SEED_OFFSET
from pyro_backpass.cli import main
from pyro_backpass.data import CATEGORIES, DEFAULT_SIZE
from pyro_backpass.data.rendered import render_objects


@pytest.mark.parametrize("compositional", [False, True])
def test_train_backbone_smoke(tmp_path, capsys, compositional):
    out = tmp_path / "bb"
    argv = ["train-backbone", "--smoke", "--no-progress", "--out", str(out), "--seed", "3"]
    main(argv + (["--compositional"] if compositional else []))
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= summary["held_out_accuracy"] <= 1.0
    config = json.loads(out.with_suffix(".json").read_text())
    training = config["info"]["training"]
    assert training["config"]["compositional"] is compositional
    assert training["config"]["epochs"] == 1 and len(training["history"]) == 1
    if compositional:
        assert training["history"][0]["penalty"] > 0
    bb = Backbone.load(out)
    assert bb.categories == CATEGORIES
    x = torch.rand(2, 3, DEFAULT_SIZE, DEFAULT_SIZE)
    assert bb.predict(x).shape == (2,)


@pytest.mark.parametrize("compositional", [False, True])
def test_train_backbone_localised_smoke(tmp_path, capsys, compositional):
    out = tmp_path / "bb"
    main(["train-backbone", "--smoke", "--no-progress", "--out", str(out), "--localised",
          "--background-levels", "conv3_1", "pool4", "--background-weight", "0.5"]
         + (["--compositional"] if compositional else []))  # fmt: skip
    training = json.loads(out.with_suffix(".json").read_text())["info"]["training"]
    assert training["config"]["localised"] is True
    assert training["config"]["background_levels"] == ["conv3_1", "pool4"]
    record = training["history"][0]
    # A binary cross-entropy and an energy ratio, both positive on real scenes; the penalty
    # recorded only when it was computed.
    assert record["localisation"] > 0 and record["background"] > 0
    assert ("penalty" in record) is compositional
    if compositional:
        assert record["penalty"] > 0
    assert Backbone.load(out).categories == CATEGORIES


def test_train_backbone_bad_options(tmp_path, capsys):
    base = ["train-backbone", "--smoke", "--no-progress", "--out", str(tmp_path / "x")]
    for argv, message in [
        (base + ["--categories", "airplane", "zebra"], "unknown categories \\['zebra'\\]"),
        (base[:2] + ["--compositional", "--penalty-levels", "pool9"] + base[2:], "not levels of"),
        (base + ["--cfg", "16,X,32"], "argument --cfg"),
        (base + ["--background-levels", "pool4"], "only with localised"),
        (base + ["--localised", "--background-levels", "pool9"], "background levels \\['pool9'\\]"),
        (base + ["--localised", "--background-weight", "0"], "argument --background-weight"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("name", ["default", "compositional", "localised"])
def test_shipped_backbone_classifies_unseen_renders(name):
    bb = Backbone.shipped(name)
    assert bb.categories == CATEGORIES and bb.image_size == (DEFAULT_SIZE, DEFAULT_SIZE)
    assert [s.name for s in bb.levels][0] == "image" and bb.levels[-1].name == "category"
    # Objects from a seed no training or held-out set used (train: 0, held-out: 0 + offset).
    images, labels = render_objects(
        CATEGORIES, 10, size=DEFAULT_SIZE, seed=2 * HELD_OUT_SEED_OFFSET
    )
    acc = (bb.predict(images) == labels).float().mean().item()
    assert acc >= 0.9, f"shipped backbone accuracy {acc:.2f} on 50 unseen renders"
