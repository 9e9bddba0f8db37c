"""Backbones: the CNNs whose activations the generative model explains.

``Backbone.default()`` (a small VGG trained on the rendered objects, shipped inside the
package), ``Backbone.vgg16(weights=...)`` (torchvision's VGG16 features), ``SmallVGG`` (the
config-built classifier), ``Activations`` (what a forward pass returns), the
feature-compositionality study and the training library behind ``pyro-backpass train-backbone``
(the command itself is in :mod:`pyro_backpass.cli`).

``Backbone.default(compositional=True)`` and ``train-backbone --compositional`` use the
objective of Stone et al. (2017), "Teaching Compositionality to CNNs", which is covered by US
patent 11,216,727; it is offered as an option and is never used unless asked for.
"""

from pyro_backpass.backbone.activations import Activations, downsample_mask, read_levels
from pyro_backpass.backbone.backbone import SHIPPED_BACKBONES, VGG16_CFG, Backbone
from pyro_backpass.backbone.compositionality import (
    CompositionalityScore,
    compositionality_score,
    distractor_sweep,
)
from pyro_backpass.backbone.localisation import (
    background_ratio,
    cell_targets,
    localisation_loss,
)
from pyro_backpass.backbone.small_vgg import DEFAULT_CFG, SmallVGG, make_layers
from pyro_backpass.backbone.train import (
    HELD_OUT_SEED_OFFSET,
    TrainConfig,
    TrainResult,
    train_backbone,
)
from pyro_backpass.results import DistractorSweep

__all__ = [
    "Activations",
    "Backbone",
    "CompositionalityScore",
    "DEFAULT_CFG",
    "DistractorSweep",
    "HELD_OUT_SEED_OFFSET",
    "SHIPPED_BACKBONES",
    "SmallVGG",
    "TrainConfig",
    "TrainResult",
    "VGG16_CFG",
    "background_ratio",
    "cell_targets",
    "compositionality_score",
    "distractor_sweep",
    "downsample_mask",
    "localisation_loss",
    "make_layers",
    "read_levels",
    "train_backbone",
]
