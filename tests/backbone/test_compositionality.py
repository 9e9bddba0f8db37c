"""Compositionality study, score and the Stone et al. penalty, on synthetic inputs."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
import torch

from pyro_backpass.backbone import Activations, Backbone, SmallVGG
from pyro_backpass.backbone.compositionality import (
    compositionality_score,
    distractor_sweep,
    masked_change,
)
from pyro_backpass.backbone.penalty import compositional_penalty
from pyro_backpass.levels import levels_from_cfg
from pyro_backpass.viz.plotting import plot_distractor_sweep

CFG = [4, "M", 8, "M"]


def backbone() -> Backbone:
    net = SmallVGG(CFG, num_classes=2)
    return Backbone.from_small_vgg(
        net, categories=["a", "b"], image_size=32, mean=[0.5] * 3, std=[0.25] * 3
    )


def square(x0: int, y0: int, side: int, colour: float, size: int = 32):
    img = torch.zeros(3, size, size)
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    img[:, mask] = colour
    return img, mask


def test_masked_change_matches_loops():
    scene, alone = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    w = torch.rand(2, 4, 4)
    err, energy = masked_change(scene, alone, w)
    for o in range(2):
        e = sum(
            float(w[o, i, j]) * float(scene[o, c, i, j] - alone[o, c, i, j]) ** 2
            for c in range(3)
            for i in range(4)
            for j in range(4)
        )
        en = sum(
            float(w[o, i, j]) * float(alone[o, c, i, j]) ** 2
            for c in range(3)
            for i in range(4)
            for j in range(4)
        )
        assert err[o].item() == pytest.approx(e, rel=1e-5)
        assert energy[o].item() == pytest.approx(en, rel=1e-5)


def test_score_zero_for_identical_and_image_level_by_hand():
    bb = backbone()
    obj, mask = square(4, 4, 8, 0.8)
    clutter, cmask = square(20, 20, 8, 0.3)
    scene = torch.where(cmask, clutter, obj)
    same = compositionality_score(
        bb, obj[None], obj[None], mask[None], torch.tensor([0]), batch_size=1
    )
    assert all(v == 0 for v in same.relative_change.values())
    # Clutter that overlaps a quarter of the object's mask, painted 0.8 -> 0.3.
    occluder, omask = square(8, 8, 4, 0.3)
    scene = torch.where(omask, occluder, obj)
    score = compositionality_score(bb, scene[None], obj[None], mask[None], torch.tensor([0]))
    # Image level: sqrt(16 px * 3 ch * 0.5^2 / (64 px * 3 ch * 0.8^2)).
    expected = ((16 * 0.25) / (64 * 0.64)) ** 0.5
    assert score.relative_change["image"] == pytest.approx(expected, rel=1e-5)
    assert list(score.relative_change) == ["image", "conv1_1", "pool1", "conv2_1", "pool2"]
    assert score.n_objects == 1
    with pytest.raises(ValueError, match="must agree"):
        compositionality_score(bb, scene[None], obj[None], mask[None], torch.tensor([0, 0]))


def test_distractor_sweep_and_plot():
    bb = backbone()
    obj, mask = square(18, 10, 10, 0.9)
    dist, dmask = square(2, 12, 6, 0.2)
    sweep = distractor_sweep(bb, obj, mask, dist, dmask, step=3)
    T = len(sweep.shifts)
    assert sweep.frames.shape == (T, 3, 32, 32)
    # Frame 0: the distractor is entirely out of frame, so nothing changes.
    torch.testing.assert_close(sweep.frames[0], obj)
    assert all(sweep.change[k][0] < 1e-5 for k in sweep.change)  # batching rounding only
    # The gap shrinks by `step` per frame; the last frame overlaps the object.
    assert (sweep.gap[:-1] - sweep.gap[1:] == 3).all()
    # Right edge starts at column -1: columns 0..17 lie between it and the object at 18.
    assert sweep.gap[0] == 18 and sweep.gap[-1] < 0
    # A 6x6 distractor covers at most 36 of the 10x10 object's pixels.
    assert 0 < sweep.occluded[-1] <= sweep.occluded.max() <= 0.36 + 1e-6
    assert sweep.occluded[0] == 0
    # At the image level nothing changes inside the object's mask until it is covered.
    img = sweep.change["image"]
    assert (img[sweep.occluded == 0] == 0).all() and (img[sweep.occluded > 0] > 0).all()
    # A distractor at another height is first moved to the object's row, so it still passes.
    high, hmask = square(2, 24, 6, 0.2)
    moved = distractor_sweep(bb, obj, mask, high, hmask, step=3)
    torch.testing.assert_close(moved.occluded, sweep.occluded)
    fig, ax = plot_distractor_sweep(sweep)
    assert len(ax.lines) == len(sweep.change) - 1 + 1  # one line per level but image, + axvline
    fig2, ax2 = plt.subplots()
    assert plot_distractor_sweep(sweep, levels=["pool2"], ax=ax2) == (fig2, ax2)
    plt.close("all")
    with pytest.raises(ValueError, match="empty"):
        distractor_sweep(bb, obj, mask, dist, torch.zeros_like(dmask))
    with pytest.raises(ValueError, match="bool"):
        distractor_sweep(bb, obj, mask.float(), dist, dmask)


def _acts(tensors: dict[str, torch.Tensor]) -> Activations:
    specs = levels_from_cfg(CFG, image_size=8, num_categories=2)[:-1]
    return Activations({s.name: tensors[s.name] for s in specs}, specs)


def test_penalty_limits_and_scale():
    specs = levels_from_cfg(CFG, image_size=8, num_categories=2)[:-1]
    alone = {s.name: torch.rand(3, *s.shape) for s in specs}
    scene = {s.name: torch.rand(2, *s.shape) for s in specs}
    scene_index = torch.tensor([0, 0, 1])
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[:, 2:6, 2:6] = True
    levels = ["pool1", "pool2"]
    # Scene equal to every object inside its mask (here: everywhere) -> zero penalty.
    same = {k: v[[0, 2]] for k, v in alone.items()}
    alone_same = {k: v[[0, 0, 2]] for k, v in alone.items()}
    for kind in ("relative", "absolute"):
        p = compositional_penalty(
            _acts(same), _acts(alone_same), masks, scene_index, levels=levels, kind=kind
        )
        assert p.item() == 0
    rel = compositional_penalty(_acts(scene), _acts(alone), masks, scene_index, levels=levels)
    ab = compositional_penalty(
        _acts(scene), _acts(alone), masks, scene_index, levels=levels, kind="absolute"
    )
    big = {k: 10 * v for k, v in scene.items()}, {k: 10 * v for k, v in alone.items()}
    rel10 = compositional_penalty(_acts(big[0]), _acts(big[1]), masks, scene_index, levels=levels)
    ab10 = compositional_penalty(
        _acts(big[0]), _acts(big[1]), masks, scene_index, levels=levels, kind="absolute"
    )
    assert rel10.item() == pytest.approx(rel.item(), rel=1e-5)  # scale invariant
    assert ab10.item() == pytest.approx(100 * ab.item(), rel=1e-5)  # quadratic in scale
    with pytest.raises(ValueError, match="cannot penalise"):
        compositional_penalty(_acts(scene), _acts(alone), masks, scene_index, levels=["image"])
    with pytest.raises(ValueError, match="kind"):
        compositional_penalty(
            _acts(scene), _acts(alone), masks, scene_index, levels=levels, kind="l1"
        )
