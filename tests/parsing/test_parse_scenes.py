"""parse_scenes (each step's backward pass batched across images) against the per-image parse:
every image's result must be what ``parse_scene`` / ``run_parse`` gives for that image alone —
same instances in the same order, categories, stop reason, masks (IoU ≥ 0.99) and scores (up to
float32 rounding of batched kernels) — on a batch of rendered scenes of different sizes, types,
and parse lengths (one stops at once, one finds several objects)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pyro_backpass import GenerativeModel, parse_scene, parse_scenes, run_parse
from pyro_backpass.data import make_scene, split_seed
from pyro_backpass.parsing import StopCriterion

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gm():
    return GenerativeModel.default()


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def _close(a: float | None, b: float | None, scale: float) -> bool:
    """Equal up to float32 rounding of a difference of log-likelihoods of size ``scale``."""
    if a is None or b is None:
        return a is b
    return abs(a - b) <= 1e-5 * max(abs(scale), 1.0) + 1e-3


def _assert_same_parse(got, want) -> None:
    assert got.stop_reason == want.stop_reason
    assert got.size == want.size and got.threshold == want.threshold
    assert [i.category for i in got.instances] == [i.category for i in want.instances]
    for g, w in zip(got.instances, want.instances, strict=True):
        assert _iou(g.mask, w.mask) >= 0.99 and _iou(g.amodal_mask, w.amodal_mask) >= 0.99
        assert _close(g.log_joint, w.log_joint, w.log_joint)
        assert _close(g.score, w.score, w.log_joint), (g.score, w.score)
        assert (g.view, g.scale) == (w.view, w.scale)
    scale = max([abs(i.log_joint) for i in want.instances] + [abs(want.stop_score or 0.0)])
    assert _close(got.stop_score, want.stop_score, 10 * scale)


def _scene(i: int) -> torch.Tensor:
    return make_scene(seed=split_seed("test", i)).image  # (3, 64, 64)


@pytest.fixture(scope="module")
def mixed():
    """Rendered test scenes of three sizes and three image types."""
    wide = F.interpolate(_scene(7)[None], size=(56, 80), mode="bilinear", align_corners=False)[0]
    pixels = (_scene(1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # (64, 64, 3)
    tall = np.asarray(Image.fromarray(pixels).resize((48, 72)))  # (72, 48, 3) uint8
    pil = Image.fromarray((_scene(9).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return [_scene(7), tall, wide, pil]


def test_each_image_parses_as_it_does_alone(gm, mixed):
    # the LLR with threshold 0 (a hypothesis must beat background), so parses end by the
    # criterion; top_k=5 modes per step keeps it quick
    opts = {"threshold": 0.0, "criterion": StopCriterion.llr(), "top_k": 5, "max_objects": 3}
    want = [run_parse(gm, image, **opts) for image in mixed]
    counts = [len(p.instances) for p in want]
    assert 0 in counts and max(counts) >= 2  # precondition: a mixed batch, checked
    assert "below_threshold" in {p.stop_reason for p in want}
    got = parse_scenes(gm, mixed, **opts)
    assert len(got) == len(mixed)
    for g, w in zip(got, want, strict=True):
        _assert_same_parse(g, w)


def test_shipped_options_match_parse_scene(gm, mixed):
    want = [parse_scene(gm, image, max_objects=1) for image in mixed[:2]]
    for g, w in zip(parse_scenes(gm, mixed[:2], max_objects=1), want, strict=True):
        _assert_same_parse(g, w)


@pytest.mark.slow
def test_beam_and_scales_batched_match_alone(gm, mixed):
    opts = {"beam": 2, "scales": (1.0, 1.5), "max_objects": 2, "threshold": 0.0, "top_k": 5}
    want = [run_parse(gm, image, **opts) for image in mixed[1:3]]
    for g, w in zip(parse_scenes(gm, mixed[1:3], **opts), want, strict=True):
        _assert_same_parse(g, w)


def test_edge_cases_and_bad_input_name_the_image(gm):
    assert parse_scenes(gm, []) == []
    with pytest.raises(TypeError, match="parse_scene"):
        parse_scenes(gm, torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match=r"images\[1\]"):
        parse_scenes(gm, [torch.rand(3, 64, 64), torch.full((3, 8, 8), 2.0)])
    with pytest.raises(TypeError, match=r"images\[0\]"):
        parse_scenes(gm, ["not an image"])
