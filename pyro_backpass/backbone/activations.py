"""``Activations``: the activations of one forward pass, by canonical level name.

A backbone's forward pass returns an :class:`Activations`, an ordered, read-only mapping from
level names (``image``, ``conv1_1``, …, the last pool) to tensors of shape ``(B, C, H, W)``,
bottom to top, together with the :class:`~pyro_backpass.levels.LevelSpec` of each level. The
specs follow the actual input size, so a backbone trained at 64 px can be run on a 128 px scene.

The activations are read by :func:`read_levels`, an explicit loop over the layers of a
VGG-style ``features`` stack. Forward hooks are the usual tool but capture the wrong tensor
under VGG's in-place ReLUs (the conv hook sees its output *before* the ReLU overwrites it, and
keeps a reference to the overwritten storage).

References:
    Wang, Zhang, Xie, Yuille (2016). A backward pass through a CNN using a generative model
    of its activations. arXiv:1611.02767.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyro_backpass.levels import Cfg, LevelSpec, level_names

__all__ = ["Activations", "downsample_mask", "read_levels"]


class Activations(Mapping[str, Tensor]):
    """Ordered mapping level name → activation tensor ``(B, C, H, W)``, bottom to top.

    :param tensors: level name → tensor, in network order, starting with ``image``.
    :param levels: one :class:`LevelSpec` per tensor, same names and order; each spec's shape
        must equal the tensor's shape without the batch dimension.
    """

    __slots__ = ("_tensors", "_levels")

    def __init__(self, tensors: Mapping[str, Tensor], levels: tuple[LevelSpec, ...]) -> None:
        names = list(tensors)
        if names != [spec.name for spec in levels]:
            raise ValueError(
                f"tensor names {names} do not match level names {[s.name for s in levels]}"
            )
        for spec in levels:
            t = tensors[spec.name]
            if t.dim() != 4 or tuple(t.shape[1:]) != spec.shape:
                raise ValueError(
                    f"level {spec.name!r}: tensor shape {tuple(t.shape)} does not match "
                    f"spec (B, {spec.channels}, {spec.height}, {spec.width})"
                )
        self._tensors = dict(tensors)
        self._levels = tuple(levels)

    @property
    def levels(self) -> tuple[LevelSpec, ...]:
        """The spec of every level present, in network order."""
        return self._levels

    @property
    def batch_size(self) -> int:
        return next(iter(self._tensors.values())).shape[0]

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"no level {name!r}; levels are {list(self._tensors)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def spec(self, name: str) -> LevelSpec:
        for s in self._levels:
            if s.name == name:
                return s
        raise KeyError(f"no level {name!r}; levels are {list(self._tensors)}")

    def detach(self) -> Activations:
        return Activations({k: v.detach() for k, v in self._tensors.items()}, self._levels)

    def __repr__(self) -> str:
        body = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._tensors.items())
        return f"Activations({body})"


def read_levels(features: nn.Sequential, cfg: Cfg, x: Tensor) -> Iterator[tuple[str, Tensor]]:
    """Run ``features`` (torchvision ``make_layers`` layout) on ``x``; yield each level.

    A conv level is yielded after its ReLU, a pool level after the pool. ``features`` must be
    exactly conv, ReLU per int in ``cfg`` and one max-pool per ``"M"``.
    """
    names = iter(level_names(cfg))
    for module in features:
        x = module(x)
        # The value after a conv is only half the level: its ReLU (often in place) follows.
        if isinstance(module, (nn.ReLU, nn.MaxPool2d)):
            yield next(names), x


def downsample_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Fraction of each level cell that the mask covers: ``(B, H, W)`` bool → ``(B, h, w)``.

    Area averaging over the cell each activation pools from, as in Stone et al. (2017), who
    project the object mask to each layer's grid; a soft mask avoids an arbitrary threshold.
    When ``H`` is not a multiple of ``h`` the trailing rows are dropped, as VGG's floor-mode
    pools drop them.
    """
    if mask.dim() != 3:
        raise ValueError(f"mask must be (B, H, W), got shape {tuple(mask.shape)}")
    h, w = size
    H, W = mask.shape[-2:]
    fh, fw = H // h, W // w
    if fh < 1 or fw < 1:
        raise ValueError(f"cannot downsample a {H}x{W} mask to {h}x{w}")
    m = mask[:, : h * fh, : w * fw].to(torch.get_default_dtype())
    return F.avg_pool2d(m.unsqueeze(1), (fh, fw)).squeeze(1)  # (B, h, w)
