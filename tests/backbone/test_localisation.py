"""The scene localisation objective (issue #10, lever 3) against loops over cells in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyro_backpass.backbone import Backbone, SmallVGG
from pyro_backpass.backbone.localisation import (
    background_ratio,
    cell_targets,
    localisation_loss,
)

CFG = (4, "M", 4, "M", 8, "M", 8, "M")


def _objects(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(5, 16, 16, generator=gen) < 0.3
    masks[4] = False  # an instance hidden entirely
    labels = torch.tensor([0, 2, 0, 1, 2])
    scene_index = torch.tensor([0, 0, 0, 2, 1])  # scene 0: two of category 0
    return masks, labels, scene_index


@pytest.mark.parametrize("full_cover", [0.25, 1.0])
def test_cell_targets_against_a_loop_over_cells(full_cover):
    masks, labels, scene_index = _objects()
    got = cell_targets(masks, labels, scene_index, n_scenes=3, num_classes=3, size=(4, 4),
                       full_cover=full_cover)  # fmt: skip
    want = np.zeros((3, 3, 4, 4))
    m = masks.numpy()
    for s in range(3):
        for k in range(3):
            mine = [o for o in range(len(m)) if scene_index[o] == s and labels[o] == k]
            union = np.zeros((16, 16), dtype=bool)
            for o in mine:
                union |= m[o]
            for i in range(4):
                for j in range(4):
                    cover = union[4 * i : 4 * i + 4, 4 * j : 4 * j + 4].mean()
                    want[s, k, i, j] = min(1.0, cover / full_cover)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)
    assert got[1].sum() == 0  # the hidden instance makes no positive
    if full_cover == 1.0:  # two instances of category 0 in scene 0: their union, not the larger
        one = cell_targets(masks[:1], labels[:1], scene_index[:1], n_scenes=3, num_classes=3,
                           size=(4, 4), full_cover=1.0)  # fmt: skip
        assert (got[0, 0] > one[0, 0]).any()


def test_localisation_loss_is_scipy_free_bce():
    gen = torch.Generator().manual_seed(1)
    logits, targets = torch.randn(2, 3, 4, 4, generator=gen), torch.rand(2, 3, 4, 4, generator=gen)
    x, t = logits.double().numpy(), targets.double().numpy()
    want = np.mean(np.logaddexp(0, x) - t * x)  # −t log σ(x) − (1 − t) log(1 − σ(x))
    assert abs(localisation_loss(logits, targets).item() - want) < 1e-5
    with pytest.raises(ValueError, match="differ"):
        localisation_loss(logits, targets[:, :2])


def test_background_ratio_against_numpy():
    bb = Backbone.from_small_vgg(SmallVGG(CFG, num_classes=3), categories=("a", "b", "c"),
                                 image_size=16, mean=[0.5] * 3, std=[0.2] * 3)  # fmt: skip
    masks, labels, scene_index = _objects()
    acts = bb(torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2)))
    got = background_ratio(acts, masks, scene_index, levels=["conv1_1", "pool2"])
    union = np.zeros((3, 16, 16), dtype=bool)
    for o in range(len(masks)):
        union[int(scene_index[o])] |= masks[o].numpy()
    ratios = []
    for name, cell in (("conv1_1", 1), ("pool2", 4)):
        f = acts[name].detach().double().numpy()
        energy = (f**2).sum(1)  # (S, h, w)
        h = f.shape[-1]
        on = union.reshape(3, h, cell, h, cell).mean(axis=(2, 4))
        ratios.append(((1 - on) * energy).sum() / (1 - on).sum() / ((on * energy).sum() / on.sum()))
    assert abs(got.item() - np.mean(ratios)) < 1e-4 * np.mean(ratios)
    got.backward()  # gradients reach the network
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in bb.parameters())
    with pytest.raises(ValueError, match="only conv and pool"):
        background_ratio(acts, masks, scene_index, levels=["image"])
    with pytest.raises(ValueError, match="scene_index"):
        background_ratio(acts, masks, scene_index + 5, levels=["pool2"])
    with pytest.raises(ValueError, match="image's size"):
        background_ratio(acts, masks[:, :8, :8], scene_index, levels=["pool2"])
    # Nothing to compare (no object anywhere): NaN, not a perfect 0.
    assert background_ratio(acts, masks[4:], scene_index[4:], levels=["pool2"]).isnan()


def test_cell_logits_average_to_the_logits_and_match_a_1x1_convolution():
    net = SmallVGG(CFG, num_classes=3)
    bb = Backbone.from_small_vgg(net, categories=("a", "b", "c"), image_size=16,
                                 mean=[0.5] * 3, std=[0.2] * 3)  # fmt: skip
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    cells = bb.cell_logits(x)  # (2, 3, 1, 1) at 16 px
    top = bb(x)["pool4"]
    conv = torch.nn.functional.conv2d(top, net.classifier.weight[:, :, None, None],
                                      net.classifier.bias)  # fmt: skip
    torch.testing.assert_close(cells, conv)
    big = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(bb.cell_logits(big).mean((-2, -1)), bb.logits(big))


def test_cell_targets_errors():
    masks, labels, scene_index = _objects()
    kw = dict(n_scenes=3, num_classes=3, size=(4, 4))
    with pytest.raises(ValueError, match="bool"):
        cell_targets(masks.float(), labels, scene_index, **kw)
    with pytest.raises(ValueError, match="one per mask"):
        cell_targets(masks, labels[:2], scene_index, **kw)
    with pytest.raises(ValueError, match="long tensors"):
        cell_targets(masks, labels.float(), scene_index, **kw)
    with pytest.raises(ValueError, match="labels must lie"):
        cell_targets(masks, labels + 3, scene_index, **kw)
    with pytest.raises(ValueError, match="full_cover"):
        cell_targets(masks, labels, scene_index, full_cover=0.0, **kw)
