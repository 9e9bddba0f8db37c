"""The one layer-naming table: canonical level names and their specs.

A *level* is one activation map of a VGG-style backbone, named the way torchvision's VGG papers
and code name them: ``image``, ``conv1_1``, ``conv1_2``, ``pool1``, ``conv2_1``, …, and finally
``category``. Every dict of activations in this package uses these names, in network order
(bottom to top). A VGG-style network is described by a config list, as in torchvision's
``make_layers``: an int is a 3×3 conv (padding 1) with that many output channels followed by a
ReLU, ``"M"`` a 2×2 max-pool with stride 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

LevelKind = Literal["image", "conv", "pool", "category"]
Cfg = Sequence[int | str]

__all__ = [
    "Cfg",
    "LevelKind",
    "LevelSpec",
    "full_resolution_level",
    "level_names",
    "levels_from_cfg",
    "levels_up_to",
]


@dataclass(frozen=True)
class LevelSpec:
    """Shape and kind of one level. ``category`` has ``height == width == 1``."""

    name: str
    kind: LevelKind
    channels: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    @property
    def numel(self) -> int:
        return self.channels * self.height * self.width


def _check_cfg(cfg: Cfg) -> None:
    if len(cfg) == 0:
        raise ValueError("cfg is empty: give at least one conv layer, e.g. [8, 'M']")
    for i, item in enumerate(cfg):
        if item == "M":
            if i == 0:
                raise ValueError("cfg must start with a conv layer (an int), not 'M'")
            if cfg[i - 1] == "M":
                raise ValueError(f"cfg has two pools in a row at position {i}: {list(cfg)}")
        elif isinstance(item, bool) or not isinstance(item, int) or item <= 0:
            raise ValueError(
                f"cfg entries must be positive ints (conv channels) or 'M' (max-pool); "
                f"got {item!r} at position {i}"
            )


def level_names(cfg: Cfg) -> list[str]:
    """Canonical names of the backbone levels a cfg produces (no ``image``/``category``).

    >>> level_names([4, 4, "M", 8, "M"])
    ['conv1_1', 'conv1_2', 'pool1', 'conv2_1', 'pool2']
    """
    _check_cfg(cfg)
    names, block, index = [], 1, 1
    for item in cfg:
        if item == "M":
            names.append(f"pool{block}")
            block, index = block + 1, 1
        else:
            names.append(f"conv{block}_{index}")
            index += 1
    return names


def levels_from_cfg(
    cfg: Cfg, *, image_size: int | tuple[int, int], num_categories: int, in_channels: int = 3
) -> tuple[LevelSpec, ...]:
    """All levels, bottom to top: ``image``, the cfg's levels, then ``category``.

    Convs keep the spatial size (3×3, padding 1); pools halve it (floor), as in VGG.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if num_categories < 1:
        raise ValueError(f"num_categories must be >= 1, got {num_categories}")
    specs = [LevelSpec("image", "image", in_channels, h, w)]
    channels = in_channels
    for name, item in zip(level_names(cfg), cfg, strict=True):
        if item == "M":
            h, w = h // 2, w // 2
            if h < 1 or w < 1:
                raise ValueError(f"image_size {image_size} is too small for cfg {list(cfg)}")
            specs.append(LevelSpec(name, "pool", channels, h, w))
        else:
            channels = int(item)
            specs.append(LevelSpec(name, "conv", channels, h, w))
    specs.append(LevelSpec("category", "category", num_categories, 1, 1))
    return tuple(specs)


def levels_up_to(levels: Sequence[LevelSpec], top_level: str) -> tuple[LevelSpec, ...]:
    """``levels`` (``image`` … ``category``) cut so that ``top_level`` is the last level below
    ``category``: a hierarchy whose top hidden level is finer than the network's last one.

    >>> specs = levels_from_cfg([4, "M", 8, "M"], image_size=16, num_categories=2)
    >>> [s.name for s in levels_up_to(specs, "pool1")]
    ['image', 'conv1_1', 'pool1', 'category']
    """
    levels = tuple(levels)
    if len(levels) < 2 or levels[0].kind != "image" or levels[-1].kind != "category":
        raise ValueError("levels must run from an 'image' level up to a 'category' level")
    names = [s.name for s in levels[1:-1]]
    if top_level not in names:
        raise ValueError(
            f"top_level {top_level!r} is not a level of this network; choose one of {names}"
        )
    cut = names.index(top_level) + 2  # image, then the levels up to and including top_level
    return levels[:cut] + levels[-1:]


def full_resolution_level(levels: Sequence[LevelSpec]) -> str:
    """The level whose on-elements define an object's mask: the lowest hidden level with the
    image's resolution (``image`` itself if there is none).

    >>> specs = levels_from_cfg([4, "M", 8, "M"], image_size=16, num_categories=2)
    >>> full_resolution_level(specs)
    'conv1_1'
    """
    image = levels[0]
    for spec in levels[1:-1]:
        if (spec.height, spec.width) == (image.height, image.width):
            return spec.name
    return image.name
