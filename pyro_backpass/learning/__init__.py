"""Learning (paper §2.3): the observation model's parameters from scene/object pairs
(:func:`fit_observation_model`) and the top-down model by hard EM (:func:`fit_hard_em`), on
targets that are the backbone's activations of single objects masked to the object.
"""

from pyro_backpass.learning.calibration import UPPER_LEVELS, calibrate_scale_td, top_clamped_iou
from pyro_backpass.learning.evaluation import mask_iou, object_passes, tune_mask_threshold
from pyro_backpass.learning.hard_em import (
    EMConfig,
    EMIteration,
    EMResult,
    e_step_level,
    fit_hard_em,
    object_targets,
    window_scores,
)
from pyro_backpass.learning.observation_fit import (
    LevelFit,
    ObservationFit,
    fit_background,
    fit_level,
    fit_observation_model,
    scene_pairs,
)
from pyro_backpass.learning.ppc import observation_ppc, observation_statistics
from pyro_backpass.learning.targets import masked_activations, max_pool_mask
from pyro_backpass.learning.train import PRESETS, TrainConfig, render_object_set, train_model

__all__ = [
    "EMConfig",
    "EMIteration",
    "EMResult",
    "LevelFit",
    "ObservationFit",
    "PRESETS",
    "TrainConfig",
    "UPPER_LEVELS",
    "calibrate_scale_td",
    "e_step_level",
    "fit_background",
    "fit_hard_em",
    "fit_level",
    "fit_observation_model",
    "mask_iou",
    "masked_activations",
    "max_pool_mask",
    "object_passes",
    "object_targets",
    "observation_ppc",
    "observation_statistics",
    "render_object_set",
    "scene_pairs",
    "top_clamped_iou",
    "train_model",
    "tune_mask_threshold",
    "window_scores",
]
