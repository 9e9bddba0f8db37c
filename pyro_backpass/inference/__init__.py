"""Inference in the generative model (paper §2.2): the closed form of eq. (13), the objective
(:func:`log_joint`), the greedy backward pass, exact MAP by enumeration, and sampling.

``greedy_map`` and ``exact_map`` share one signature, ``(model, bu, *, category=, clamp=,
priors=, observed=, top_k=)``, and return a :class:`~pyro_backpass.MapResult`.
"""

from pyro_backpass.inference.background import background_log_likelihood
from pyro_backpass.inference.closed_form import closed_form_td, closed_form_with, select
from pyro_backpass.inference.exact import DEFAULT_MAX_MEMORY, chunk_bytes, exact_map, joint_states
from pyro_backpass.inference.greedy import greedy_map, top_level_scores
from pyro_backpass.inference.grid_map import potts_energy, potts_grid_map
from pyro_backpass.inference.hypotheses import (
    DEFAULT_CHUNK_ELEMENTS,
    hypothesis_scores,
    template_planes,
)
from pyro_backpass.inference.inputs import MapInputs, check_map_inputs
from pyro_backpass.inference.lower_choice import lower_completions, lower_levels, lower_sites
from pyro_backpass.inference.lower_consensus import LOWER_TEMPERATURE, consensus_below
from pyro_backpass.inference.mask_refine import (
    MAX_CRF_PIXELS,
    colour_crf,
    crf_mask,
    readout_unary,
    refine_mask,
)
from pyro_backpass.inference.objective import (
    freeze_priors,
    full_res_level,
    log_joint,
    object_mask,
    top_down_pass,
)
from pyro_backpass.inference.sampling import sample
from pyro_backpass.inference.verification import (
    READ_LEVELS,
    check_verifier,
    default_verifier,
    descent_features,
    expected_iou,
    lower_descent_features,
    mode_values,
    region_views,
    verified_map,
    verifier_fingerprint,
)

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "DEFAULT_MAX_MEMORY",
    "LOWER_TEMPERATURE",
    "MAX_CRF_PIXELS",
    "MapInputs",
    "READ_LEVELS",
    "background_log_likelihood",
    "check_map_inputs",
    "check_verifier",
    "chunk_bytes",
    "closed_form_td",
    "closed_form_with",
    "colour_crf",
    "consensus_below",
    "crf_mask",
    "default_verifier",
    "descent_features",
    "exact_map",
    "expected_iou",
    "freeze_priors",
    "full_res_level",
    "greedy_map",
    "hypothesis_scores",
    "joint_states",
    "log_joint",
    "lower_completions",
    "lower_descent_features",
    "lower_levels",
    "lower_sites",
    "mode_values",
    "object_mask",
    "potts_energy",
    "potts_grid_map",
    "readout_unary",
    "refine_mask",
    "region_views",
    "sample",
    "select",
    "template_planes",
    "top_down_pass",
    "top_level_scores",
    "verified_map",
    "verifier_fingerprint",
]
