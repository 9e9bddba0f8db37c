"""A learned readout of an object's mask from its reconstruction F̂ (an option of the model).

The default mask of a backward pass is a rule on one level: the elements of F̂ at the
full-resolution level whose largest channel reaches ``mask_threshold``
(:func:`~pyro_backpass.inference.objective.object_mask`). A :class:`MaskReadout` instead reads
the mask from F̂ of a few levels at once — each level's F̂ repeated up to the mask's size
(nearest), standardised per channel, then one ``kernel_size``² logistic filter over all their
channels; an element is the object's where the logit exceeds ``threshold``. It sees only F̂,
the pass's explanation of the input, never the input itself. Fitted on training objects by
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
    """Logistic filter over F̂ of ``levels``, at ``size``.

    :param levels: the specs of the levels read (hidden levels of the model).
    :param size: ``(H, W)`` of the mask (the model's full-resolution level).
    :param kernel_size: odd width of the filter.
    """

    def __init__(
        self, levels: Sequence[LevelSpec], *, size: tuple[int, int], kernel_size: int = 5
    ) -> None:
        super().__init__()
        if not levels:
            raise ValueError("MaskReadout needs at least one level to read")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
        self.levels = tuple(levels)
        self.size = (int(size[0]), int(size[1]))
        self.kernel_size = int(kernel_size)
        channels = sum(s.channels for s in self.levels)
        self.weight = nn.Parameter(torch.zeros(1, channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(1))
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
        x = torch.cat(maps, dim=1).to(self.weight.dtype)  # (B, C_total, H, W)
        return (x - self.mean[:, None, None]) / self.scale[:, None, None]

    def logits(self, td: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(B, H, W)`` logits of "the object's element"."""
        x = self.features(td)
        return F.conv2d(x, self.weight, self.bias, padding=self.kernel_size // 2)[:, 0]

    def forward(self, td: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The ``(B, H, W)`` bool mask: logits above ``threshold``."""
        return self.logits(td) > self.threshold

    def config(self) -> dict:
        return {"levels": self.level_names, "kernel_size": self.kernel_size,
                "size": list(self.size)}  # fmt: skip

    def extra_repr(self) -> str:
        return f"levels={self.level_names}, size={self.size}, kernel_size={self.kernel_size}"
