"""One JSON schema for a parse, shared by ``pyro-backpass parse`` and ``parse-folder``: masks
in COCO run-length encoding (``pycocotools``), so parses can be evaluated with COCO tools."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from pyro_backpass.parsing.scene_parse import SceneParse

__all__ = ["encode_mask", "mask_box", "parse_record"]


def encode_mask(mask: Any) -> dict[str, Any]:
    """COCO RLE of a bool ``(H, W)`` mask, ``counts`` as str (JSON-serialisable)."""
    m = np.asfortranarray(np.asarray(mask, dtype=np.uint8))
    rle = mask_utils.encode(m)
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_box(mask: Any) -> list[int]:
    """``[x, y, w, h]`` of a bool mask's pixels (COCO's box convention); zeros if empty."""
    m = np.asarray(mask, dtype=bool)
    rows, cols = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
    if len(rows) == 0:
        return [0, 0, 0, 0]
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    return [x0, y0, x1 - x0, y1 - y0]


def parse_record(parse: SceneParse, *, image_id: str) -> dict[str, Any]:
    """A parse as a JSON-serialisable dict::

        {"image_id": str, "size": [H, W], "stop_reason": str, "threshold": float,
         "criterion": {"weights": {...}, "bias": float, "mean": {...}, "scale": {...}} | null,
         "instances": [{"category": str, "score": float, "llr": float, "box": [x, y, w, h],
                        "segmentation": {"size": [H, W], "counts": str},
                        "stop_inputs": {"llr", "visible", "amodal", "step", ...} | null}, ...]}

    ``box`` and ``segmentation`` describe the visible mask; ``score`` is the instance's stop
    statistic (for the shipped model the fitted log-odds that it is a new object) and ``llr``
    its log-likelihood ratio against background (null if unknown); ``stop_inputs`` what that
    statistic read (``StopCriterion.from_dict(record["criterion"]).statistic(**stop_inputs)``
    is ``score``). ``segmentation`` decodes with
    ``pycocotools.mask.decode`` (after ``counts.encode()``).
    """
    if not isinstance(parse, SceneParse):
        raise TypeError(f"parse must be a SceneParse, got {type(parse).__name__}")
    if not isinstance(image_id, str):
        raise TypeError(f"image_id must be a str, got {type(image_id).__name__}")
    instances = []
    for inst in parse.instances:
        m = inst.mask.detach().cpu().numpy().astype(bool)
        instances.append(
            {
                "category": inst.category,
                "score": float(inst.score),
                "llr": float(inst.llr) if math.isfinite(inst.llr) else None,
                "box": mask_box(m),
                "segmentation": encode_mask(m),
                "stop_inputs": None if inst.stop_inputs is None else dict(inst.stop_inputs),
            }
        )
    h, w = parse.size
    return {
        "image_id": image_id,
        "size": [h, w],
        "stop_reason": parse.stop_reason,
        "threshold": float(parse.threshold),
        "criterion": parse.criterion,
        "instances": instances,
    }
