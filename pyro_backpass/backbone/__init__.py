"""Backbones: the CNNs whose activations the generative model explains.

``Backbone.default()`` (a small VGG trained on the rendered objects, shipped inside the
package), ``Backbone.vgg16(weights=...)`` (torchvision's VGG16 features), ``SmallVGG`` (the
config-built classifier), ``Activations`` (what a forward pass returns), the
feature-compositionality study and the ``train-backbone`` command.
"""

from pyro_backpass.backbone.activations import Activations, downsample_mask, read_levels
from pyro_backpass.backbone.backbone import VGG16_CFG, Backbone
from pyro_backpass.backbone.small_vgg import DEFAULT_CFG, SmallVGG, make_layers

__all__ = [
    "DEFAULT_CFG",
    "VGG16_CFG",
    "Activations",
    "Backbone",
    "SmallVGG",
    "downsample_mask",
    "make_layers",
    "read_levels",
]
