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
    plot_distractor_sweep,
)
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
from pyro_backpass.levels import LevelSpec, level_names, levels_from_cfg

__version__ = "0.1.0"

__all__ = [
    "Activations",
    "Backbone",
    "CATEGORIES",
    "CompositionalityScore",
    "DEFAULT_SIZE",
    "DistractorSweep",
    "LevelSpec",
    "ObjectDataset",
    "ObjectFolder",
    "ObjectParams",
    "RenderedObjects",
    "Scene",
    "SceneFolder",
    "Scenes",
    "SmallVGG",
    "compositionality_score",
    "distractor_sweep",
    "level_names",
    "levels_from_cfg",
    "make_scene",
    "plot_distractor_sweep",
    "render_object",
]
