"""Learning (paper §2.3): the observation model's parameters from scene/object pairs
(:func:`fit_observation_model`) and the top-down model by hard EM (:func:`fit_hard_em`), on
targets that are the backbone's activations of single objects masked to the object. Every fit
takes ``world=`` (:class:`World`) to share its data among ``torchrun``'s processes.
"""

from pyro_backpass.learning.calibration import (
    UPPER_LEVELS,
    calibrate_scale_td,
    own_top_assignment,
    top_clamped_iou,
    top_clamped_passes,
)
from pyro_backpass.learning.distributed import SINGLE_PROCESS, World
from pyro_backpass.learning.e_step import e_step_level, window_scores
from pyro_backpass.learning.evaluation import mask_iou, object_passes, tune_mask_threshold
from pyro_backpass.learning.hard_em import (
    EMConfig,
    EMIteration,
    EMResult,
    fit_hard_em,
    object_targets,
)
from pyro_backpass.learning.mask_fit import (
    DEFAULT_READOUT_LEVELS,
    LOGIT_GRID,
    fit_mask_readout,
    fit_readout_net,
    object_reconstructions,
    scene_object_reconstructions,
    standardise_readout,
)
from pyro_backpass.learning.observation_fit import (
    LevelFit,
    ObservationFit,
    fit_background,
    fit_level,
    fit_observation_model,
    scene_pairs,
)
from pyro_backpass.learning.offset_priors import fit_offset_priors
from pyro_backpass.learning.ppc import observation_ppc, observation_statistics
from pyro_backpass.learning.targets import masked_activations, max_pool_mask
from pyro_backpass.learning.train import (
    PRESETS,
    TrainConfig,
    render_object_set,
    train_mask_readout,
    train_model,
)
from pyro_backpass.learning.verifier_fit import (
    VerifierExample,
    descent_examples,
    fit_descent_verifier,
    listwise_loss,
    lower_descent_examples,
)

__all__ = [
    "DEFAULT_READOUT_LEVELS",
    "EMConfig",
    "EMIteration",
    "EMResult",
    "LOGIT_GRID",
    "LevelFit",
    "ObservationFit",
    "PRESETS",
    "SINGLE_PROCESS",
    "TrainConfig",
    "UPPER_LEVELS",
    "VerifierExample",
    "World",
    "calibrate_scale_td",
    "descent_examples",
    "e_step_level",
    "fit_background",
    "fit_descent_verifier",
    "fit_hard_em",
    "fit_level",
    "fit_mask_readout",
    "fit_observation_model",
    "fit_offset_priors",
    "fit_readout_net",
    "listwise_loss",
    "lower_descent_examples",
    "mask_iou",
    "masked_activations",
    "max_pool_mask",
    "object_passes",
    "object_reconstructions",
    "object_targets",
    "observation_ppc",
    "observation_statistics",
    "own_top_assignment",
    "render_object_set",
    "scene_object_reconstructions",
    "scene_pairs",
    "standardise_readout",
    "top_clamped_iou",
    "top_clamped_passes",
    "train_mask_readout",
    "train_model",
    "tune_mask_threshold",
    "window_scores",
]
