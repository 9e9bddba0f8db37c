"""σ0 calibration: the multiplier it keeps is the best of those it tried, each scored as a
fresh copy of the model with that σ0 scores."""

import copy

import pytest
import torch

from pyro_backpass import Scenes
from pyro_backpass.data import split_seed
from pyro_backpass.learning import PRESETS, calibrate_scale_td, top_clamped_iou, train_model


@pytest.fixture(scope="module")
def smoke_model(tmp_path_factory):
    torch.manual_seed(0)
    return train_model(PRESETS["smoke"], out_dir=tmp_path_factory.mktemp("m"), progress=False)


def test_keeps_the_best_multiplier_and_scores_it_like_a_fresh_copy(smoke_model):
    gm = copy.deepcopy(smoke_model)
    scenes = list(Scenes(2, seed=split_seed("validation")))
    levels = ("pool4", "conv4_1")
    base = {n: float(gm.steps[n].scale_td) for n in levels}
    scores = calibrate_scale_td(gm, gm.backbone, scenes, levels=levels,
                                multipliers=(1.0, 0.3), progress=False)  # fmt: skip
    for m, score in scores.items():
        fresh = copy.deepcopy(smoke_model)
        for n in levels:
            fresh.steps[n].scale_td.fill_(base[n] * m)
        assert score == pytest.approx(top_clamped_iou(fresh, fresh.backbone, scenes), abs=1e-6)
    best = max(scores, key=lambda m: (scores[m], -list(scores).index(m)))
    for n in levels:
        assert float(gm.steps[n].scale_td) == pytest.approx(base[n] * best, rel=1e-6)


def test_bad_options_are_named(smoke_model):
    gm = copy.deepcopy(smoke_model)
    with pytest.raises(ValueError, match="none of the levels"):
        calibrate_scale_td(gm, gm.backbone, [], levels=("nope",))
    with pytest.raises(ValueError, match="multipliers"):
        calibrate_scale_td(gm, gm.backbone, [], multipliers=(0.0,))
