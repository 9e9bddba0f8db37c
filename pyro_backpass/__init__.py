"""pyro_backpass: a backward pass through a CNN using a generative model of its activations.

The public API is defined here, once; notebooks, the CLI and benchmarks import from the root.
"""

from pyro_backpass.backbone import (
    Activations,
    Backbone,
    CompositionalityScore,
    DistractorSweep,
    SmallVGG,
    compositionality_score,
    distractor_sweep,
)
from pyro_backpass.closed_form import closed_form_td
from pyro_backpass.data import (
    CATEGORIES,
    DEFAULT_SIZE,
    ObjectDataset,
    ObjectFolder,
    ObjectParams,
    RenderedObjects,
    Scene,
    SceneFolder,
    Scenes,
    make_scene,
    render_object,
)
from pyro_backpass.exact_map import exact_map, joint_states
from pyro_backpass.generative_model import GenerativeModel
from pyro_backpass.greedy_map import greedy_map
from pyro_backpass.levels import LevelSpec, level_names, levels_from_cfg
from pyro_backpass.plotting import (
    plot_distractor_sweep,
    plot_modes,
    plot_reconstruction,
    plot_samples,
)
from pyro_backpass.priors import CategoricalPrior, NGramPrior, SitePrior, UniformPrior
from pyro_backpass.results import MapResult, Sample
from pyro_backpass.sampling import sample
from pyro_backpass.scoring import log_joint
from pyro_backpass.thresholded_gaussian import ThresholdedGaussian

__version__ = "0.1.0"

__all__ = [
    "Activations",
    "Backbone",
    "CATEGORIES",
    "CategoricalPrior",
    "CompositionalityScore",
    "DEFAULT_SIZE",
    "DistractorSweep",
    "GenerativeModel",
    "LevelSpec",
    "MapResult",
    "NGramPrior",
    "ObjectDataset",
    "ObjectFolder",
    "ObjectParams",
    "RenderedObjects",
    "Sample",
    "Scene",
    "SceneFolder",
    "Scenes",
    "SitePrior",
    "SmallVGG",
    "ThresholdedGaussian",
    "UniformPrior",
    "closed_form_td",
    "compositionality_score",
    "distractor_sweep",
    "exact_map",
    "greedy_map",
    "joint_states",
    "level_names",
    "levels_from_cfg",
    "log_joint",
    "make_scene",
    "plot_distractor_sweep",
    "plot_modes",
    "plot_reconstruction",
    "plot_samples",
    "render_object",
    "sample",
]
