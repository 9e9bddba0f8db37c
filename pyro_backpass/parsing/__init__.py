"""Scene parsing (paper §3): repeated backward passes that subtract each found object from every
level, posterior modes, top-down queries, completion and baselines; and the instance-mask
metrics a parse is scored by (:mod:`.metrics`).
"""

from pyro_backpass.parsing.metrics import (
    InstanceEvaluation,
    Matching,
    PredictedInstances,
    adjusted_rand_index,
    class_sensitivity,
    coco_mask_ap,
    foreground_ari,
    mask_ious,
    match_instances,
    occluded_iou,
)

__all__ = [
    "InstanceEvaluation",
    "Matching",
    "PredictedInstances",
    "adjusted_rand_index",
    "class_sensitivity",
    "coco_mask_ap",
    "foreground_ari",
    "mask_ious",
    "match_instances",
    "occluded_iou",
]
