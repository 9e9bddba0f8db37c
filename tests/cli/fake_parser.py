"""A stand-in for the scene parser in parse-folder tests (``--parser
tests.cli.fake_parser:parse_batch``): a record of the pinned schema computed from the pixels, and
an exception for any image whose id contains ``poison``."""

import torch


def parse_batch(gm, images, image_ids):
    records = []
    for image, image_id in zip(images, image_ids, strict=True):
        if "poison" in image_id:
            raise RuntimeError(f"poisoned {image_id}")
        h, w = image.shape[-2:]
        bright = image.mean(dim=0) > 0.5  # (H, W)
        counts = torch.bincount(bright.T.reshape(-1).long(), minlength=2).tolist()
        records.append({
            "image_id": image_id, "size": [h, w], "stop_reason": "fake", "threshold": 0.0,
            "instances": [{"category": "airplane", "score": round(float(image.mean()), 6),
                           "box": [0, 0, w, h],
                           "segmentation": {"size": [h, w], "counts": counts}}],
        })  # fmt: skip
    return records
