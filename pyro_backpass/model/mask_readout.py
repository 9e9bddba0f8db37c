"""A learned readout of an object's mask from its reconstruction F̂ (an option of the model).

The default mask of a backward pass is a rule on one level: the elements of F̂ at the
full-resolution level whose largest channel reaches ``mask_threshold``
(:func:`~pyro_backpass.inference.objective.object_mask`). A :class:`MaskReadout` instead reads
the mask from F̂ of a few levels at once — each level's F̂ repeated up to the mask's size
(nearest), standardised per channel, then either one ``kernel_size``² logistic filter over all
their channels (``hidden = 0``) or a small convolutional net (``hidden`` > 0: a 1×1 convolution
to ``hidden`` channels, ReLU, a ``kernel_size``² convolution, ReLU, a 3×3 convolution to one
logit); an element is the object's where the logit exceeds ``threshold``. It sees only F̂, the
pass's explanation of the input, never the input itself. Fitted on training objects by
:func:`~pyro_backpass.learning.fit_mask_readout`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pyro_backpass.levels import LevelSpec

__all__ = ["MaskReadout"]


class MaskReadout(nn.Module):
    """Logistic filter (``hidden = 0``) or small convolutional net over F̂ of ``levels``, at
    ``size``.

    :param levels: the specs of the levels read (hidden levels of the model).
    :param size: ``(H, W)`` of the mask (the model's full-resolution level).
    :param kernel_size: odd width of the filter (of the middle convolution when ``hidden`` > 0).
    :param hidden: channels of the net's two hidden layers; 0: one logistic filter.
    """

    def __init__(
        self,
        levels: Sequence[LevelSpec],
        *,
        size: tuple[int, int],
        kernel_size: int = 5,
        hidden: int = 0,
    ) -> None:
        super().__init__()
        if not levels:
            raise ValueError("MaskReadout needs at least one level to read")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
            raise ValueError(f"hidden must be an int >= 0, got {hidden!r}")
        self.levels = tuple(levels)
        self.size = (int(size[0]), int(size[1]))
        self.kernel_size = int(kernel_size)
        self.hidden = hidden
        channels = sum(s.channels for s in self.levels)
        if hidden == 0:  # one logistic filter, zero-initialised (a convex fit)
            self.weight = nn.Parameter(torch.zeros(1, channels, kernel_size, kernel_size))
            self.bias = nn.Parameter(torch.zeros(1))
        else:  # PyTorch's default (random) initialisation: seed it for a reproducible fit
            self.layers = nn.Sequential(
                nn.Conv2d(channels, hidden, 1), nn.ReLU(),
                nn.Conv2d(hidden, hidden, kernel_size, padding=kernel_size // 2), nn.ReLU(),
                nn.Conv2d(hidden, 1, 3, padding=1),
            )  # fmt: skip
        self.register_buffer("mean", torch.zeros(channels))  # per-channel standardisation
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("threshold", torch.zeros(()))  # on the logit

    @property
    def level_names(self) -> list[str]:
        return [s.name for s in self.levels]

    def features(self, td: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """F̂ of every read level at the mask's size, standardised: ``(B, C_total, H, W)``."""
        missing = [n for n in self.level_names if n not in td]
        if missing:
            raise ValueError(f"MaskReadout reads levels {self.level_names}; td lacks {missing}")
        maps = []
        for spec in self.levels:
            x = td[spec.name]
            if x.dim() != 4 or tuple(x.shape[1:]) != spec.shape:
                raise ValueError(f"MaskReadout: td[{spec.name!r}] must be (B, *{spec.shape}), "
                                 f"got {tuple(x.shape)}")  # fmt: skip
            maps.append(F.interpolate(x, size=self.size, mode="nearest"))
        x = torch.cat(maps, dim=1).to(self.mean.dtype)  # (B, C_total, H, W)
        return (x - self.mean[:, None, None]) / self.scale[:, None, None]

    def logits(self, td: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(B, H, W)`` logits of "the object's element"."""
        return self.logits_of_features(self.features(td))

    def logits_of_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W)`` logits from standardised features ``(B, C_total, H, W)``."""
        if self.hidden:
            return self.layers(x)[:, 0]
        return F.conv2d(x, self.weight, self.bias, padding=self.kernel_size // 2)[:, 0]

    def forward(self, td: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The ``(B, H, W)`` bool mask: logits above ``threshold``."""
        return self.logits(td) > self.threshold

    def config(self) -> dict:
        return {"levels": self.level_names, "kernel_size": self.kernel_size,
                "size": list(self.size), "hidden": self.hidden}  # fmt: skip

    def extra_repr(self) -> str:
        return (f"levels={self.level_names}, size={self.size}, kernel_size={self.kernel_size}, "
                f"hidden={self.hidden}")  # fmt: skip
