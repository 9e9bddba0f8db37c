"""pyro_backpass: a backward pass through a CNN using a generative model of its activations.

The public API is defined here, once; notebooks, the CLI and benchmarks import from the root.
"""

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
    "CATEGORIES",
    "DEFAULT_SIZE",
    "LevelSpec",
    "ObjectDataset",
    "ObjectFolder",
    "ObjectParams",
    "RenderedObjects",
    "Scene",
    "SceneFolder",
    "Scenes",
    "level_names",
    "levels_from_cfg",
    "make_scene",
    "render_object",
]
