"""A scene objective that teaches the backbone's top levels to localise objects (issue #10,
lever 3: "a backbone whose top levels localise objects ... also trained on scenes with
several labels").

The plain backbone sees only single objects on plain backgrounds, so clutter drives its upper
channels freely, and the generative model of those channels cannot tell clutter from an
object. ``train-backbone --localised`` adds, on each step's batch of cluttered scenes with
their instance masks (only instances of known categories; clutter is never an instance):

- **cell labels** (a dense multi-label loss): the :class:`SmallVGG` head is a global average
  pool of per-cell logits ``W · f[:, h, w] + b`` (the class activation map), so each top-level
  cell gets its own logistic target per category, ``min(1, cover / full_cover)`` where
  ``cover`` is the fraction of the cell the union of the category's visible masks covers.
  Cells of clutter and plain background are negatives for every category;
- optionally, **a background penalty** on named conv/pool levels: the mean activation energy
  ``Σ_c f²`` of a cell not covered by any known object, divided by that of covered cells
  (area-weighted, as :func:`~pyro_backpass.backbone.activations.downsample_mask` projects the
  masks). The ratio is invariant to the scale of a level, so it cannot be lowered by
  shrinking every activation; only by firing less off the objects than on them.

References:
    Zhou, Khosla, Lapedriza, Oliva, Torralba (2016). Learning deep features for discriminative
    localization (class activation maps). CVPR.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pyro_backpass.backbone.activations import Activations, downsample_mask

__all__ = ["background_ratio", "cell_targets", "localisation_loss"]


def _union(masks: Tensor, group: Tensor, n_groups: int) -> Tensor:
    """Per group, the union of its masks: bool ``(n_groups, H, W)`` on the masks' device."""
    count = masks.new_zeros((n_groups, *masks.shape[-2:]), dtype=torch.int32)
    count.index_add_(0, group, masks.to(torch.int32))
    return count > 0


def _check_objects(masks: Tensor, labels: Tensor, scene_index: Tensor, n_scenes: int) -> None:
    if masks.dim() != 3 or masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool (O, H, W), got {masks.dtype} {tuple(masks.shape)}")
    if labels.shape != (len(masks),) or scene_index.shape != (len(masks),):
        raise ValueError(
            f"labels {tuple(labels.shape)} and scene_index {tuple(scene_index.shape)} must both "
            f"be ({len(masks)},), one per mask"
        )
    if labels.dtype != torch.long or scene_index.dtype != torch.long:
        raise ValueError(
            f"labels and scene_index must be long tensors, got {labels.dtype}, {scene_index.dtype}"
        )
    if len(masks) and (int(scene_index.min()) < 0 or int(scene_index.max()) >= n_scenes):
        raise ValueError(f"scene_index must lie in [0, {n_scenes}), got {scene_index.tolist()}")


def cell_targets(
    masks: Tensor,
    labels: Tensor,
    scene_index: Tensor,
    *,
    n_scenes: int,
    num_classes: int,
    size: tuple[int, int],
    full_cover: float = 0.25,
) -> Tensor:
    """Per-cell, per-category targets in ``[0, 1]``: ``(S, K, h, w)``.

    :param masks: visible masks of the ``O`` instances, bool ``(O, H, W)``.
    :param labels: their category indices ``(O,)`` in ``[0, num_classes)``.
    :param scene_index: their scene ``(O,)`` in ``[0, n_scenes)``.
    :param size: the top level's ``(h, w)``.
    :param full_cover: a cell whose area the category's instances (their union) cover at least
        this much is a full positive; below, the target falls linearly to 0.
    """
    _check_objects(masks, labels, scene_index, n_scenes)
    if not 0.0 < full_cover <= 1.0:
        raise ValueError(f"full_cover must be in (0, 1], got {full_cover}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got {labels.tolist()}")
    union = _union(masks, scene_index * num_classes + labels, n_scenes * num_classes)
    cover = downsample_mask(union, size)  # (S·K, h, w)
    return (cover / full_cover).clamp(max=1.0).reshape(n_scenes, num_classes, *size)


def localisation_loss(cell_logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy of per-cell logits ``(S, K, h, w)`` against
    :func:`cell_targets` of the same shape."""
    if cell_logits.shape != targets.shape:
        raise ValueError(
            f"cell logits {tuple(cell_logits.shape)} and targets {tuple(targets.shape)} differ"
        )
    return F.binary_cross_entropy_with_logits(cell_logits, targets.to(cell_logits))


def background_ratio(
    acts: Activations,
    masks: Tensor,
    scene_index: Tensor,
    *,
    levels: Sequence[str],
) -> Tensor:
    """Mean over ``levels`` of (energy per cell off the objects) / (energy per cell on them).

    ``acts`` are the activations of ``S`` scenes; ``masks`` ``(O, H, W)`` the visible masks of
    their known-category instances (at the image's size) and ``scene_index`` ``(O,)`` their
    scenes. A cell's weight "on" is the fraction of it any instance covers, "off" the rest.
    Returns a scalar with gradients to ``acts``; NaN when the scenes have no covered or no
    uncovered area (nothing to compare).
    """
    if len(levels) == 0:
        raise ValueError("give at least one level for the background penalty")
    image = acts[acts.levels[0].name]  # (S, 3, H, W)
    n_scenes = image.shape[0]
    _check_objects(masks, torch.zeros_like(scene_index), scene_index, n_scenes)
    if masks.shape[-2:] != image.shape[-2:]:
        raise ValueError(
            f"masks are {tuple(masks.shape[-2:])}, the scenes {tuple(image.shape[-2:])}: "
            "give the masks at the image's size"
        )
    union = _union(masks, scene_index, n_scenes)  # (S, H, W)
    ratios = []
    for name in levels:
        spec = acts.spec(name)
        if spec.kind in ("image", "category"):
            raise ValueError(f"cannot penalise level {name!r}: only conv and pool levels learn")
        on = downsample_mask(union, (spec.height, spec.width)).to(image)  # (S, h, w)
        energy = acts[name].pow(2).sum(1)  # (S, h, w)
        on_area, off_area = on.sum(), (1 - on).sum()
        if float(on_area) <= 0 or float(off_area) <= 0:
            return image.new_tensor(float("nan"))
        per_on = (on * energy).sum() / on_area
        per_off = ((1 - on) * energy).sum() / off_area
        ratios.append(per_off / per_on.clamp_min(1e-8))
    return torch.stack(ratios).mean()
