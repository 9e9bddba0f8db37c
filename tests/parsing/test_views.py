"""Image conversion and the views of a scan over scales."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pyro_backpass.parsing import as_image, make_views


def test_as_image_converts_every_mode_to_rgb_in_unit_range():
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    ref = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    assert torch.allclose(as_image(rgb), ref)
    assert torch.allclose(as_image(Image.fromarray(rgb)), ref)
    assert torch.allclose(as_image(torch.from_numpy(rgb).permute(2, 0, 1)), ref)
    grey = as_image(Image.fromarray(rgb[..., 0]))
    assert grey.shape == (3, 20, 30) and torch.equal(grey[0], grey[2])
    assert torch.allclose(grey[0], ref[0])
    rgba = np.concatenate([rgb, np.zeros((20, 30, 1), np.uint8)], axis=-1)  # fully transparent
    assert torch.allclose(as_image(Image.fromarray(rgba, "RGBA")), torch.ones(3, 20, 30))
    assert torch.allclose(as_image(rgba.astype(np.float32) / 255), torch.ones(3, 20, 30))


def test_as_image_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        as_image(torch.full((3, 4, 4), 2.0))
    with pytest.raises(ValueError, match="channels"):
        as_image(torch.rand(5, 6, 7))
    with pytest.raises(TypeError, match="PIL"):
        as_image([[0.0]])


def test_a_model_sized_image_is_its_own_view():
    image = torch.rand(3, 64, 64)
    (view,) = make_views(image, size=64, scales=(1.0,))
    assert torch.equal(view.image, image) and view.origin == (0, 0)
    mask = torch.rand(64, 64) > 0.5
    assert torch.equal(view.to_image(mask, 64, 64), mask)
    assert torch.equal(view.from_image(mask), mask)


@pytest.mark.parametrize("shape", [(100, 60), (48, 200), (64, 64)])
def test_windows_cover_the_resized_image_and_map_back(shape):
    h, w = shape
    image = torch.rand(3, h, w)
    views = make_views(image, size=64, scales=(1.0, 2.0))
    for v in views:
        assert v.image.shape == (3, 64, 64)
    big = [v for v in views if v.scale == 2.0]
    rh, rw = big[0].resized
    covered = torch.zeros(rh, rw, dtype=torch.bool)
    for v in big:
        oy, ox = v.origin
        covered[max(oy, 0) : oy + 64, max(ox, 0) : ox + 64] = True
    assert covered.all()
    # A box drawn in image space comes back from every view at the same place.
    box = torch.zeros(h, w, dtype=torch.bool)
    box[h // 4 : h // 2, w // 4 : w // 2] = True
    for v in views:
        back = v.to_image(v.from_image(box), h, w)
        seen = v.to_image(torch.ones(64, 64, dtype=torch.bool), h, w) & box
        if seen.sum() > 0.5 * box.sum():  # up to a resampled pixel at each edge
            assert (back & seen).sum() / (back | seen).sum() > 0.6
