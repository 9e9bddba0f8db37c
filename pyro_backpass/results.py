"""Result types of inference and sampling (frozen dataclasses, not bare tuples)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DistractorSweep", "MapResult", "Mode", "Sample", "ranked_modes"]


def _shapes(tensors: dict[str, torch.Tensor] | None) -> str:
    if tensors is None:
        return "None"
    return "{" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in tensors.items()) + "}"


def _values(v: torch.Tensor, *, shown: int = 4, digits: int | None = None) -> str:
    """The first ``shown`` values of ``v`` as ``[a, b, …]`` (not a tensor dump)."""
    values = v.detach().reshape(-1).tolist()
    if digits is not None:
        values = [round(x, digits) for x in values]
    text = ", ".join(str(x) for x in values[:shown])
    return f"[{text}{', …' if len(values) > shown else ''}]"


def _summary(assignment: dict[str, torch.Tensor]) -> str:
    return "{" + ", ".join(f"{site}={_values(v)}" for site, v in assignment.items()) + "}"


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
    :ivar mask: ``(B, H, W)`` bool: the image-space support of the reconstructed object: the
        model's learned :class:`~pyro_backpass.model.MaskReadout` of F̂ if it has one (the
        shipped model does), else the on-elements (F̂_td ≥ ``mask_threshold`` in any channel)
        of the first full-resolution level above the image (``conv1_1`` for VGG), which fires
        on dark objects too; the image level itself when the model has no such level.
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

    def __repr__(self) -> str:
        modes = "None" if self.modes is None else f"{[len(m) for m in self.modes][:4]} per image"
        return (
            f"MapResult(batch={self.log_joint.shape[0]}, "
            f"log_joint={_values(self.log_joint, digits=2)}, "
            f"assignment={_summary(self.assignment)}, td={_shapes(self.td)}, "
            f"mask={tuple(self.mask.shape)}, modes={modes})"
        )


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

    def __repr__(self) -> str:
        n = next(iter(self.assignment.values())).shape[0] if self.assignment else 0
        return (
            f"Sample(n={n}, assignment={_summary(self.assignment)}, td={_shapes(self.td)}, "
            f"bu={_shapes(self.bu)})"
        )


@dataclass(frozen=True)
class DistractorSweep:
    """A distractor moved in from the left across an object; the object's change per level.

    ``gap[t]``: pixels between the distractor's right edge and the object's left edge
    (negative once they overlap); ``frames``: ``(T, 3, H, W)``; ``change[level]``: ``(T,)``;
    ``occluded[t]``: fraction of the object's mask the distractor covers.
    """

    shifts: torch.Tensor
    gap: torch.Tensor
    frames: torch.Tensor
    change: dict[str, torch.Tensor]
    occluded: torch.Tensor

    def __repr__(self) -> str:
        return (
            f"DistractorSweep(T={self.frames.shape[0]}, gap={_values(self.gap)}, "
            f"frames={tuple(self.frames.shape)}, change={_shapes(self.change)}, "
            f"occluded={_values(self.occluded, digits=3)})"
        )


def ranked_modes(
    assignment: dict[str, torch.Tensor], log_joint: torch.Tensor, order: torch.Tensor
) -> list[list[Mode]]:
    """:attr:`MapResult.modes`: per image, the candidates in ``order``, impossible ones dropped.

    :param assignment: site → ``(B, M)`` indices of M candidate assignments per image.
    :param log_joint: ``(B, M)`` their log-joints (−inf: clamped out or impossible).
    :param order: ``(B, m)`` the candidates to list, best first.
    """
    modes = []
    for i, row in enumerate(order.tolist()):
        entries = []
        for j in row:
            value = float(log_joint[i, j])
            if value > -float("inf"):
                entries.append(({s: int(v[i, j]) for s, v in assignment.items()}, value))
        modes.append(entries)
    return modes
