"""The Bayes net (paper §2.1): levels of top-down steps with hidden γ, δ, their priors, and the
thresholded-Gaussian observation model, as a Pyro model (:meth:`GenerativeModel.model`).

Nothing here searches or fits: inference (:mod:`pyro_backpass.inference`) and learning build on
these pieces.
"""

from pyro_backpass.model.checks import (
    ModelLike,
    category_indices,
    check_bu,
    check_clamp,
    check_observed,
    merge_category,
)
from pyro_backpass.model.descent_verifier import (
    LOWER_VERIFIER_FILE,
    REFINED_VERIFIER_FILE,
    DescentVerifier,
)
from pyro_backpass.model.generative_model import ENUMERATE, GenerativeModel, default_offsets
from pyro_backpass.model.mask_readout import MaskReadout
from pyro_backpass.model.observation import (
    ClosedFormConstants,
    Observation,
    closed_form_constants,
)
from pyro_backpass.model.priors import CategoricalPrior, NGramPrior, SitePrior, UniformPrior
from pyro_backpass.model.thresholded_gaussian import HALF_LOG_2PI, ThresholdedGaussian
from pyro_backpass.model.top_down import TopDownStep, offset_grid, shift_all, shift_select

__all__ = [
    "CategoricalPrior",
    "ClosedFormConstants",
    "DescentVerifier",
    "ENUMERATE",
    "GenerativeModel",
    "HALF_LOG_2PI",
    "LOWER_VERIFIER_FILE",
    "MaskReadout",
    "ModelLike",
    "NGramPrior",
    "Observation",
    "REFINED_VERIFIER_FILE",
    "SitePrior",
    "ThresholdedGaussian",
    "TopDownStep",
    "UniformPrior",
    "category_indices",
    "check_bu",
    "check_clamp",
    "check_observed",
    "closed_form_constants",
    "default_offsets",
    "merge_category",
    "offset_grid",
    "shift_all",
    "shift_select",
]
