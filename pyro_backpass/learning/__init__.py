"""Learning (paper §2.3): the observation model's parameters from scene/object pairs
(:func:`fit_observation_model`) and the top-down model by hard EM (:func:`fit_hard_em`), on
targets that are the backbone's activations of single objects masked to the object.
"""

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
    fit_level,
    fit_observation_model,
    scene_pairs,
)
from pyro_backpass.learning.targets import masked_activations, max_pool_mask

__all__ = [
    "EMConfig",
    "EMIteration",
    "EMResult",
    "LevelFit",
    "ObservationFit",
    "e_step_level",
    "fit_hard_em",
    "fit_level",
    "fit_observation_model",
    "masked_activations",
    "max_pool_mask",
    "object_targets",
    "scene_pairs",
    "window_scores",
]
