"""The colour-bilateral CRF on a pass's mask, against a per-pixel loop written from its
formula, closed cases and a constructed scene whose answer is known."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from pyro_backpass import greedy_map, refine_mask
from pyro_backpass.inference import colour_crf


def _loop_mean_field(unary, image, *, spatial, colour, weight, iterations):
    """The module's updates, one pixel at a time in plain Python (float64)."""
    h, w = unary.shape
    u = unary.double().numpy()
    img = image.double().numpy()
    pixels = [(y, x) for y in range(h) for x in range(w)]
    q = {p: 1 / (1 + math.exp(-u[p])) for p in pixels}
    for _ in range(iterations):
        new = {}
        for i in pixels:
            message = 0.0
            for j in pixels:
                if j == i:
                    continue
                d_pos = (i[0] - j[0]) ** 2 + (i[1] - j[1]) ** 2
                d_col = float(((img[:, i[0], i[1]] - img[:, j[0], j[1]]) ** 2).sum())
                k = math.exp(-d_pos / (2 * spatial**2) - d_col / (2 * colour**2))
                message += k * (2 * q[j] - 1)
            new[i] = 1 / (1 + math.exp(-(u[i] + weight * message)))
        q = new
    return np.array([[q[(y, x)] for x in range(w)] for y in range(h)])


def test_matches_a_per_pixel_loop_of_the_formula():
    gen = torch.Generator().manual_seed(0)
    unary = torch.randn(2, 3, 4, generator=gen) * 2
    image = torch.rand(2, 3, 3, 4, generator=gen)
    kw = {"spatial": 1.5, "colour": 0.3, "weight": 0.7, "iterations": 4}
    got = colour_crf(unary, image, **kw)
    for b in range(2):
        expected = _loop_mean_field(unary[b], image[b], **kw)
        np.testing.assert_allclose(got[b].double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_one_image_shared_by_several_masks_matches_the_loop():
    """A ``(3, H, W)`` image is one kernel for every mask (the batched path)."""
    gen = torch.Generator().manual_seed(1)
    unary = torch.randn(3, 3, 4, generator=gen) * 2
    image = torch.rand(3, 3, 4, generator=gen)
    kw = {"spatial": 2.0, "colour": 0.4, "weight": 0.9, "iterations": 3}
    got = colour_crf(unary, image, **kw)
    for b in range(3):
        expected = _loop_mean_field(unary[b], image, **kw)
        np.testing.assert_allclose(got[b].double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_without_pairwise_weight_it_is_the_logistic_of_the_unary():
    from scipy.special import expit

    unary = torch.linspace(-4, 4, 30).view(1, 5, 6)
    got = colour_crf(unary, torch.rand(3, 5, 6), weight=0.0)
    np.testing.assert_allclose(got.numpy(), expit(unary.numpy()), rtol=1e-6)


def test_cuts_a_mask_at_a_colour_edge_and_keeps_it_inside():
    """Red left half, blue right half; the unary says "object" over the red half and two
    columns of the blue one: the CRF's mask is the red half, as a segmenter should give."""
    h, w = 12, 16
    image = torch.zeros(3, h, w)
    image[0, :, : w // 2] = 0.9  # red
    image[2, :, w // 2 :] = 0.9  # blue
    unary = torch.full((1, h, w), -2.0)
    unary[0, :, : w // 2 + 2] = 2.0
    unary[0, 5, 3] = -2.0  # one wrong pixel inside the red half
    mask = colour_crf(unary, image, spatial=4.0, colour=0.05, weight=1.0) > 0.5
    expected = torch.zeros(1, h, w, dtype=torch.bool)
    expected[0, :, : w // 2] = True
    assert bool((mask == expected).all())


def test_clear_errors():
    unary = torch.zeros(1, 4, 4)
    image = torch.zeros(3, 4, 4)
    with pytest.raises(ValueError, match="image must be"):
        colour_crf(unary, torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="unary must be"):
        colour_crf(torch.zeros(4, 4), image)
    with pytest.raises(ValueError, match="spatial bandwidth"):
        colour_crf(unary, image, spatial=0.0)
    with pytest.raises(ValueError, match="iterations"):
        colour_crf(unary, image, iterations=2.5)
    with pytest.raises(ValueError, match="finite"):
        colour_crf(torch.full((1, 4, 4), float("nan")), image)
    with pytest.raises(ValueError, match="up to"):
        colour_crf(torch.zeros(1, 100, 100), torch.zeros(3, 100, 100))


def test_refine_mask_is_the_pass_mask_without_pairwise_weight(airplane_scene):
    gm, scene, bu = airplane_scene
    result = greedy_map(gm, bu, category="airplane")
    same = refine_mask(gm, result, bu, scene.image, weight=0.0)
    assert bool((same == result.mask).all())
    refined = refine_mask(gm, result, bu, scene.image)
    assert refined.shape == result.mask.shape and refined.dtype == torch.bool
    plain = copy.deepcopy(gm)
    plain.mask_readout = None
    with pytest.raises(ValueError, match="mask readout"):
        refine_mask(plain, result, bu, scene.image)
