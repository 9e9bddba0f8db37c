"""Result types of inference and sampling (frozen dataclasses, not bare tuples)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MapResult", "Mode", "Sample"]

Mode = tuple[dict[str, int], float]
"""One posterior mode of one image: (assignment site → index, log-joint)."""


@dataclass(frozen=True)
class MapResult:
    """A MAP assignment of the hidden variables and the top-down activations it implies.

    :ivar assignment: site name (``category``, ``gamma_<level>``, ``delta_<level>``) →
        ``(B,)`` long.
    :ivar td: level name → ``(B, C, H, W)``: F̂_td, the closed-form maximisers given the
        assignment (``category`` is the one-hot ``(B, N, 1, 1)``).
    :ivar log_joint: ``(B,)``: the objective at the assignment (see :func:`log_joint`).
    :ivar modes: for ``top_k > 1``: per image a list of ``(assignment, log_joint)``, best first
        (the first is the MAP); else None.
    :ivar mask: ``(B, H, W)`` bool: the image-space support of the reconstructed object, the
        on-elements (F̂_td ≥ λ in any channel) of the first full-resolution level above the
        image (``conv1_1`` for VGG), which fires on dark objects too; the image level itself
        when the model has no such level.
    """

    assignment: dict[str, torch.Tensor]
    td: dict[str, torch.Tensor]
    log_joint: torch.Tensor
    mask: torch.Tensor
    modes: list[list[Mode]] | None = None

    @property
    def image(self) -> torch.Tensor:
        """The reconstruction in image space, ``(B, 3, H, W)``."""
        return self.td["image"]


@dataclass(frozen=True)
class Sample:
    """Ancestral samples from the model's trace.

    :ivar td: level name → ``(n, C, H, W)`` (``category`` as one-hot ``(n, N, 1, 1)``).
    :ivar assignment: site name → ``(n,)`` long.
    :ivar bu: level name → ``(n, C, H, W)`` sampled observations (``observe=True``), else None.
    """

    td: dict[str, torch.Tensor]
    assignment: dict[str, torch.Tensor]
    bu: dict[str, torch.Tensor] | None = None

    @property
    def image(self) -> torch.Tensor:
        return self.td["image"]
