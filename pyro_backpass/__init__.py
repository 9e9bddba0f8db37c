"""pyro_backpass: a backward pass through a CNN using a generative model of its activations.

The public API is defined here, once; notebooks, the CLI and benchmarks import from the root.
The package's rooms, bottom to top (imports point down only; ``pyproject.toml`` holds the
contract that ``lint-imports`` checks):

- ``levels``, ``results``, ``files``, ``huge_pages``: shared leaves (level names, result types,
  atomic writes, PyTorch's huge-page switch)
- ``data/``: rendered objects and scenes, user image folders
- ``backbone/``: the CNNs whose activations are modelled, and their training library
- ``model/``: the Bayes net (top-down steps, priors, observation model) as a Pyro model
- ``inference/``: closed form, objective, greedy and exact MAP, sampling
- ``learning/``, ``parsing/``: fitting the model; parsing scenes (independent of each other)
- ``viz/``: figures of given results (imports only ``data`` and the leaves)
- ``cli/``: the ``pyro-backpass`` command; the only place with argparse or device choice

Importing the package asks PyTorch for transparent huge pages for large CPU tensors
(``THP_MEM_ALLOC_ENABLE=1`` unless set; see :mod:`pyro_backpass.huge_pages`): the backward pass
is about a quarter faster on CPU with them. Set ``THP_MEM_ALLOC_ENABLE=0`` to keep PyTorch's
default.
"""

# isort: off
# First: PyTorch reads THP_MEM_ALLOC_ENABLE at its first allocation, which must come after this.
from pyro_backpass import huge_pages as _huge_pages  # noqa: F401
# isort: on

from pyro_backpass.backbone import (
    Activations,
    Backbone,
    CompositionalityScore,
    SmallVGG,
    compositionality_score,
    distractor_sweep,
)
from pyro_backpass.data import (
    CATEGORIES,
    DEFAULT_SIZE,
    ImageFiles,
    ObjectDataset,
    ObjectFolder,
    ObjectParams,
    RenderedObjects,
    Scene,
    SceneFolder,
    Scenes,
    make_scene,
    render_object,
    split_seed,
)
from pyro_backpass.inference import (
    closed_form_td,
    consensus_below,
    exact_map,
    greedy_map,
    joint_states,
    log_joint,
    refine_mask,
    sample,
    verified_map,
)
from pyro_backpass.learning import (
    EMConfig,
    World,
    fit_descent_verifier,
    fit_hard_em,
    fit_mask_readout,
    fit_observation_model,
    fit_offset_priors,
)
from pyro_backpass.levels import (
    LevelSpec,
    full_resolution_level,
    level_names,
    levels_from_cfg,
    levels_up_to,
)
from pyro_backpass.model import (
    CategoricalPrior,
    DescentVerifier,
    GenerativeModel,
    MaskReadout,
    NGramPrior,
    SitePrior,
    ThresholdedGaussian,
    UniformPrior,
)
from pyro_backpass.parsing import (
    HeadChoice,
    InstanceEvaluation,
    ParsedInstance,
    PredictedInstances,
    Query,
    SceneParse,
    StopCriterion,
    adjusted_rand_index,
    class_map_prior,
    class_sensitivity,
    coco_mask_ap,
    foreground_ari,
    location_prior,
    mask_ious,
    match_instances,
    mode_label,
    occluded_iou,
    parse_activations,
    parse_record,
    parse_scene,
    parse_scenes,
    run_parse,
)
from pyro_backpass.results import DistractorSweep, MapResult, Sample
from pyro_backpass.viz import (
    plot_distractor_sweep,
    plot_instances,
    plot_mode_bars,
    plot_modes,
    plot_overlay,
    plot_reconstruction,
    plot_samples,
)

__version__ = "0.1.0"

__all__ = [
    "Activations",
    "Backbone",
    "CATEGORIES",
    "CategoricalPrior",
    "CompositionalityScore",
    "DEFAULT_SIZE",
    "DescentVerifier",
    "DistractorSweep",
    "EMConfig",
    "GenerativeModel",
    "HeadChoice",
    "ImageFiles",
    "InstanceEvaluation",
    "LevelSpec",
    "MapResult",
    "MaskReadout",
    "NGramPrior",
    "ObjectDataset",
    "ObjectFolder",
    "ObjectParams",
    "ParsedInstance",
    "PredictedInstances",
    "Query",
    "RenderedObjects",
    "Sample",
    "Scene",
    "SceneFolder",
    "SceneParse",
    "Scenes",
    "SitePrior",
    "SmallVGG",
    "StopCriterion",
    "ThresholdedGaussian",
    "UniformPrior",
    "World",
    "adjusted_rand_index",
    "class_map_prior",
    "class_sensitivity",
    "closed_form_td",
    "coco_mask_ap",
    "compositionality_score",
    "consensus_below",
    "distractor_sweep",
    "exact_map",
    "fit_descent_verifier",
    "fit_hard_em",
    "fit_mask_readout",
    "fit_observation_model",
    "fit_offset_priors",
    "foreground_ari",
    "full_resolution_level",
    "greedy_map",
    "joint_states",
    "level_names",
    "levels_from_cfg",
    "levels_up_to",
    "location_prior",
    "log_joint",
    "make_scene",
    "mask_ious",
    "match_instances",
    "mode_label",
    "occluded_iou",
    "parse_activations",
    "parse_record",
    "parse_scene",
    "parse_scenes",
    "plot_distractor_sweep",
    "plot_instances",
    "plot_mode_bars",
    "plot_modes",
    "plot_overlay",
    "plot_reconstruction",
    "plot_samples",
    "refine_mask",
    "render_object",
    "run_parse",
    "sample",
    "split_seed",
    "verified_map",
]
