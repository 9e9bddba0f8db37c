"""``run_parse(..., refine_masks=True)``: the first instance is the plain parse's, its masks
the colour CRF's refinement of that descent's readout mask (``refine_mask`` on
``greedy_map`` clamped to the instance's assignment)."""

from __future__ import annotations

import pytest
import torch

from pyro_backpass import GenerativeModel, greedy_map, make_scene, refine_mask, split_seed
from pyro_backpass.parsing import run_parse

pytestmark = pytest.mark.usefixtures("one_thread")


def test_first_instance_is_the_plain_one_with_the_crf_mask():
    gm = GenerativeModel.default()
    scene = make_scene(seed=split_seed("test", 1))  # 64 × 64: one view, the image itself
    plain = run_parse(gm, scene.image, max_objects=2)
    refined = run_parse(gm, scene.image, max_objects=2, refine_masks=True)
    assert plain.instances and refined.instances
    a, b = plain.instances[0], refined.instances[0]
    assert (a.category, a.assignment) == (b.category, b.assignment)
    assert a.score == pytest.approx(b.score)
    bu = gm.backbone(scene.image[None])
    bu = {k: v for k, v in bu.items() if k in gm.hidden_levels}
    again = greedy_map(gm, bu, clamp={s: torch.tensor([v]) for s, v in a.assignment.items()})
    torch.testing.assert_close(again.mask[0], a.amodal_mask)  # the oracle's pass is the parse's
    expected = refine_mask(gm, again, bu, scene.image)[0]
    assert bool((b.amodal_mask == expected).all())
    assert bool((b.mask == expected).all())  # the first instance: nothing claimed before it
    # The stop statistic read the readout's mask, not the CRF's: its inputs are the plain
    # instance's pixel counts (one view at the model's size), at step 0.
    want = {"llr": a.llr, "visible": float(a.mask.sum()), "amodal": float(a.amodal_mask.sum()),
            "step": 0}  # fmt: skip
    assert b.stop_inputs == pytest.approx(want) and a.stop_inputs == pytest.approx(want)
    assert refined.instances[1].stop_inputs["step"] == 1


def test_refined_masks_need_a_mask_readout():
    gm = GenerativeModel.default().attach_mask_readout(None)
    with pytest.raises(ValueError, match="mask readout"):
        run_parse(gm, torch.zeros(3, 64, 64), refine_masks=True)
