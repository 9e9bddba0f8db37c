"""Fixtures shared by the inference tests."""

from __future__ import annotations

import pytest
import torch

from pyro_backpass import GenerativeModel, make_scene


@pytest.fixture(scope="module")
def airplane_scene():
    """The shipped model, a rendered scene with an airplane, and its bottom-up activations of
    the model's hidden levels (one image): ``(gm, scene, bu)``."""
    torch.set_num_threads(1)
    gm = GenerativeModel.default()
    scene = make_scene(seed=(7, 1))
    with torch.no_grad():
        acts = gm.backbone(scene.image[None])
    return gm, scene, {k: v for k, v in acts.items() if k in gm.hidden_levels}
