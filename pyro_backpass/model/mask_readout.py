"""A learned readout of an object's mask from its reconstruction F̂ (an option of the model).

The default mask of a backward pass is a rule on one level: the elements of F̂ at the
full-resolution level whose largest channel reaches ``mask_threshold``
(:func:`~pyro_backpass.inference.objective.object_mask`). A :class:`MaskReadout` instead reads
the mask from F̂ of a few levels at once — each level's F̂ repeated up to the mask's size
(nearest), standardised per channel, then either one ``kernel_size``² logistic filter over all
their channels (``hidden = 0``) or a small convolutional net (``hidden`` > 0: a 1×1 convolution
to ``hidden`` channels, ReLU, a ``kernel_size``² convolution, ReLU, a 3×3 convolution to one
logit); an element is the object's where the logit exceeds ``threshold``. By default it sees
only F̂, the pass's explanation of the input, never the input itself; with ``reads_input`` it
also reads the input's own activations ``bu`` of the same levels (where an element is
unobserved, F̂ stands in for it), so it can draw the object's outline from the input where the
pass says the object is. Fitted on training objects by
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
    :param reads_input: also read the input's activations ``bu`` of ``levels`` (after F̂ of
        every level, in the same order); then every call needs ``bu``.
    """

    def __init__(
        self,
        levels: Sequence[LevelSpec],
        *,
        size: tuple[int, int],
        kernel_size: int = 5,
        hidden: int = 0,
        reads_input: bool = False,
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
        if not isinstance(reads_input, bool):
            raise ValueError(f"reads_input must be a bool, got {reads_input!r}")
        self.hidden = hidden
        self.reads_input = reads_input
        channels = sum(s.channels for s in self.levels) * (2 if reads_input else 1)
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

    def features(
        self,
        td: Mapping[str, torch.Tensor],
        bu: Mapping[str, torch.Tensor] | None = None,
        observed: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """F̂ of every read level at the mask's size (then, with ``reads_input``, ``bu`` of the
        same levels; F̂ where ``observed`` is False), standardised: ``(B, C_total, H, W)``."""
        sources = [("td", td)]
        if self.reads_input:
            if bu is None:
                raise ValueError("this MaskReadout reads the input's activations too "
                                 "(reads_input=True): pass bu")  # fmt: skip
            sources.append(("bu", bu))
        maps = []
        for what, values in sources:
            missing = [n for n in self.level_names if n not in values]
            if missing:
                raise ValueError(f"MaskReadout reads levels {self.level_names}; {what} lacks "
                                 f"{missing}")  # fmt: skip
            for spec in self.levels:
                x = values[spec.name]
                if x.dim() != 4 or tuple(x.shape[1:]) != spec.shape:
                    raise ValueError(f"MaskReadout: {what}[{spec.name!r}] must be "
                                     f"(B, *{spec.shape}), got {tuple(x.shape)}")  # fmt: skip
                if what == "bu":
                    if x.shape[0] != td[spec.name].shape[0]:
                        x = x.expand(td[spec.name].shape)  # one input, several descents
                    if observed is not None and spec.name in observed:
                        x = torch.where(observed[spec.name].to(torch.bool), x, td[spec.name])
                maps.append(F.interpolate(x, size=self.size, mode="nearest"))
        x = torch.cat(maps, dim=1).to(self.mean.dtype)  # (B, C_total, H, W)
        return (x - self.mean[:, None, None]) / self.scale[:, None, None]

    def logits(
        self,
        td: Mapping[str, torch.Tensor],
        bu: Mapping[str, torch.Tensor] | None = None,
        observed: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``(B, H, W)`` logits of "the object's element"."""
        return self.logits_of_features(self.features(td, bu, observed))

    def logits_of_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W)`` logits from standardised features ``(B, C_total, H, W)``."""
        if self.hidden:
            return self.layers(x)[:, 0]
        return F.conv2d(x, self.weight, self.bias, padding=self.kernel_size // 2)[:, 0]

    def forward(
        self,
        td: Mapping[str, torch.Tensor],
        bu: Mapping[str, torch.Tensor] | None = None,
        observed: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The ``(B, H, W)`` bool mask: logits above ``threshold``. ``td``: F̂ per level
        ``(B, C, H, W)``; ``bu``: the input's activations (``reads_input`` only; batch B or 1);
        ``observed``: bool masks broadcastable to ``bu``'s levels (False: F̂ is read instead)."""
        return self.logits(td, bu, observed) > self.threshold

    def config(self) -> dict:
        config = {"levels": self.level_names, "kernel_size": self.kernel_size,
                  "size": list(self.size), "hidden": self.hidden}  # fmt: skip
        if self.reads_input:  # absent: F̂ only (files written before the option read the same)
            config["reads_input"] = True
        return config

    def extra_repr(self) -> str:
        return (f"levels={self.level_names}, size={self.size}, kernel_size={self.kernel_size}, "
                f"hidden={self.hidden}, reads_input={self.reads_input}")  # fmt: skip
