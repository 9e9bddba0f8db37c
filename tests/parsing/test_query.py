"""Query: validation, the category prior and the location prior over the top level's δ."""

import pytest
import torch

from pyro_backpass import Backbone, GenerativeModel, SmallVGG
from pyro_backpass.parsing import LOCATIONS, Query, class_map_prior, location_prior, top_centre


@pytest.fixture
def gm():
    return GenerativeModel.random([2, "M", 2, "M"], num_components=2, num_categories=3,
                                  image_size=16, seed=0)  # fmt: skip


def test_query_rejects_bad_fields():
    with pytest.raises(ValueError, match="prefer"):
        Query(prefer="tallest")
    with pytest.raises(ValueError, match="location"):
        Query(location="north")
    with pytest.raises(ValueError, match="not both"):
        Query(category="c0", categories={"c0": 1.0})
    with pytest.raises(ValueError, match="location_weight"):
        Query(location="left", location_weight=-1.0)
    assert Query(location="left").place == LOCATIONS["left"]


def test_category_prior_puts_zero_on_categories_left_out(gm):
    lp = Query(categories={"c1": 3.0, "c2": 1.0}).category_prior(gm).log_probs()
    assert lp[0] == -torch.inf
    assert torch.allclose(lp[1:].exp(), torch.tensor([0.75, 0.25]))
    with pytest.raises(ValueError, match="unknown"):
        Query(categories={"zebra": 1.0}).category_prior(gm)


@pytest.mark.parametrize("place", ["left", "right", "top", "bottom", "centre"])
def test_location_prior_prefers_the_offset_that_brings_the_object_there(gm, place):
    """Oracle: brute force over δ of the distance between the shifted template centre and the
    place, in top-level cells."""
    top = gm.hidden_levels[-1]
    spec = next(s for s in gm.levels if s.name == top)
    cy, cx = top_centre(gm)
    y, x = LOCATIONS[place]
    ty, tx = y * spec.height - 0.5, x * spec.width - 0.5
    dist = [(dy + cy - ty) ** 2 + (dx + cx - tx) ** 2 for dy, dx in gm.offsets[top]]
    lp = location_prior(gm, LOCATIONS[place], weight=5.0).log_probs()
    assert int(lp.argmax()) == min(range(len(dist)), key=dist.__getitem__)
    assert torch.allclose(lp.exp().sum(), torch.tensor(1.0))
    assert torch.isfinite(lp).all()  # strong preferences stay in log space


def test_class_map_prior_reads_the_class_map_where_the_shifted_object_is_centred():
    """Oracle: the class map as a 1×1 convolution of the top level with the head's weights,
    read per δ at the rounded centre (the map's minimum outside), times the weight."""
    net = SmallVGG([2, "M", 2, "M"], num_classes=3)
    bb = Backbone.from_small_vgg(net, categories=["c0", "c1", "c2"], image_size=16,
                                 mean=[0.5] * 3, std=[0.25] * 3)  # fmt: skip
    gm = GenerativeModel.for_backbone(bb, num_components=2)
    acts = bb(torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    cam = torch.nn.functional.conv2d(acts["pool2"], net.classifier.weight[:, :, None, None],
                                     net.classifier.bias)[0, 1].detach()  # fmt: skip
    cy, cx = top_centre(gm)
    want = []
    for dy, dx in gm.offsets["pool2"]:
        y, x = round(cy + dy), round(cx + dx)
        want.append(float(cam[y, x]) if 0 <= y < 4 and 0 <= x < 4 else float(cam.min()))
    want = torch.log_softmax(2.5 * torch.tensor(want), 0)
    got = class_map_prior(gm, acts, "c1", weight=2.5).log_probs()
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one image"):
        class_map_prior(gm, bb(torch.rand(2, 3, 16, 16)), "c1", weight=1.0)
    with pytest.raises(ValueError, match="weight"):
        class_map_prior(gm, acts, "c1", weight=-1.0)
    with pytest.raises(ValueError, match="needs a category"):
        class_map_prior(gm, acts, None, weight=1.0)
    with pytest.raises(ValueError, match="unknown category"):
        class_map_prior(gm, acts, "zebra", weight=1.0)
    bare = GenerativeModel.random([2, "M", 2, "M"], num_components=2, num_categories=3,
                                  image_size=16)  # fmt: skip
    with pytest.raises(ValueError, match="backbone"):
        class_map_prior(bare, acts, "c1", weight=1.0)
