"""Scene parsing (paper §3): repeated backward passes that explain each found object away on
every level, posterior modes per step, top-down queries (category, location, preferences),
occlusion completion, imagination, and images of any size through a scan over scales.

``parse_scene`` is the entry point (``parse_scenes``: many images, their backward passes batched);
``parse_record`` is the one JSON schema of a parse; :mod:`.metrics` scores parses against the
true instances.
"""

from pyro_backpass.parsing.explaining_away import EXPLAIN_AWAY, explain_away
from pyro_backpass.parsing.head_choice import (
    EXTRA_HEAD_FEATURES,
    HEAD_CHOICE_FILE,
    HEAD_FEATURES,
    HeadChoice,
    fit_head_choice,
    head_features,
)
from pyro_backpass.parsing.labels import mode_label
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
from pyro_backpass.parsing.parser import (
    BACKGROUNDS,
    MAX_STEPS,
    parse_activations,
    parse_scene,
    parse_scenes,
    run_parse,
)
from pyro_backpass.parsing.query import (
    LOCATIONS,
    PREFERENCES,
    LogLinearPrior,
    Query,
    class_map_prior,
    location_prior,
    top_centre,
)
from pyro_backpass.parsing.record import encode_mask, mask_box, parse_record
from pyro_backpass.parsing.scene_parse import STOP_REASONS, ParsedInstance, SceneParse
from pyro_backpass.parsing.stop import (
    STOP_FEATURES,
    StopCriterion,
    fit_stop_criterion,
    region_log_prob,
    stop_features,
)
from pyro_backpass.parsing.threshold import (
    CHOICE_THRESHOLD_FILE,
    THRESHOLD_FILE,
    VERIFIED_THRESHOLD_FILE,
    default_threshold,
    model_fingerprint,
    record_fingerprint,
    threshold_record,
)
from pyro_backpass.parsing.views import View, as_image, make_views

__all__ = [
    "BACKGROUNDS",
    "CHOICE_THRESHOLD_FILE",
    "EXPLAIN_AWAY",
    "EXTRA_HEAD_FEATURES",
    "HEAD_CHOICE_FILE",
    "HEAD_FEATURES",
    "HeadChoice",
    "InstanceEvaluation",
    "LOCATIONS",
    "LogLinearPrior",
    "MAX_STEPS",
    "Matching",
    "PREFERENCES",
    "ParsedInstance",
    "PredictedInstances",
    "Query",
    "STOP_FEATURES",
    "STOP_REASONS",
    "SceneParse",
    "StopCriterion",
    "THRESHOLD_FILE",
    "VERIFIED_THRESHOLD_FILE",
    "View",
    "adjusted_rand_index",
    "as_image",
    "class_map_prior",
    "class_sensitivity",
    "coco_mask_ap",
    "default_threshold",
    "encode_mask",
    "explain_away",
    "fit_head_choice",
    "fit_stop_criterion",
    "foreground_ari",
    "head_features",
    "location_prior",
    "make_views",
    "mask_box",
    "mask_ious",
    "match_instances",
    "mode_label",
    "model_fingerprint",
    "occluded_iou",
    "parse_activations",
    "parse_record",
    "parse_scene",
    "parse_scenes",
    "record_fingerprint",
    "region_log_prob",
    "run_parse",
    "stop_features",
    "threshold_record",
    "top_centre",
]
