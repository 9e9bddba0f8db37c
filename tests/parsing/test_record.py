"""parse_record: the JSON schema of a parse, masks in COCO RLE (decoded by pycocotools)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from pyro_backpass.parsing import (
    ParsedInstance,
    SceneParse,
    StopCriterion,
    mask_box,
    parse_record,
)


def _instance(mask: torch.Tensor) -> ParsedInstance:
    return ParsedInstance(category="airplane", mask=mask, amodal_mask=mask, score=12.5,
                          reconstruction=torch.zeros(3, *mask.shape), modes=[],
                          mode_scores=[], mode_masks=None, log_joint=-1.0,
                          assignment={"category": 0})  # fmt: skip


def test_record_round_trips_through_json_and_pycocotools():
    rng = np.random.default_rng(0)
    masks = [torch.from_numpy(rng.random((17, 23)) > 0.6) for _ in range(2)]
    parse = SceneParse(instances=[_instance(m) for m in masks], stop_reason="below_threshold",
                       image=torch.rand(3, 17, 23), threshold=-3.0, stop_score=-9.0)  # fmt: skip
    record = json.loads(json.dumps(parse_record(parse, image_id="a.png")))
    assert record["image_id"] == "a.png" and record["size"] == [17, 23]
    assert record["stop_reason"] == "below_threshold"
    for inst, m in zip(record["instances"], masks, strict=True):
        rle = dict(inst["segmentation"], counts=inst["segmentation"]["counts"].encode())
        assert np.array_equal(mask_utils.decode(rle).astype(bool), m.numpy())
        assert inst["box"] == [int(v) for v in mask_utils.toBbox(rle)]
        assert inst["category"] == "airplane" and inst["score"] == 12.5
        assert inst["llr"] is None  # unknown: the instance was made without one
    assert record["criterion"] is None
    crit = StopCriterion({"step": -1.0}, bias=0.5)
    with_crit = dataclasses.replace(parse, criterion=crit.to_dict())
    back = json.loads(json.dumps(parse_record(with_crit, image_id="a.png")))["criterion"]
    assert StopCriterion.from_dict(back) == crit


def test_box_of_a_mask_is_x_y_w_h():
    m = np.zeros((10, 12), bool)
    m[2:5, 3:9] = True
    assert mask_box(m) == [3, 2, 6, 3]
    assert mask_box(np.zeros((4, 4), bool)) == [0, 0, 0, 0]


def test_record_needs_a_parse_and_a_string_id():
    parse = SceneParse(instances=[], stop_reason="max_objects", image=torch.rand(3, 4, 4),
                       threshold=0.0)  # fmt: skip
    with pytest.raises(TypeError, match="image_id"):
        parse_record(parse, image_id=3)
    with pytest.raises(TypeError, match="SceneParse"):
        parse_record({"instances": []}, image_id="x")
