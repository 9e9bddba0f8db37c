"""Measuring a fitted model on single objects: mask IoU of the backward pass, and the choice of
the mask threshold on validation objects."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pyro_backpass.backbone import Backbone
from pyro_backpass.inference import greedy_map
from pyro_backpass.inference.objective import full_res_level
from pyro_backpass.learning.distributed import SINGLE_PROCESS, World
from pyro_backpass.model import GenerativeModel

__all__ = ["mask_iou", "object_passes", "tune_mask_threshold"]


def mask_iou(pred: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Intersection over union per image of two ``(B, H, W)`` bool masks, ``(B,)``; 1 where
    both are empty."""
    if pred.shape != truth.shape or pred.dtype != torch.bool or truth.dtype != torch.bool:
        raise ValueError(f"need two bool masks of one shape, got {pred.shape}, {truth.shape}")
    inter = (pred & truth).sum(dim=(-2, -1)).float()
    union = (pred | truth).sum(dim=(-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


@torch.no_grad()
def object_passes(
    gm: GenerativeModel,
    backbone: Backbone,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """The backward pass on each image's own activations: F̂ of the mask level ``(N, C, H, W)``
    (key ``td``), the model's mask ``(N, H, W)`` (``mask``: its readout if it has one, else
    the threshold rule), the chosen category ``(N,)`` and the log-joint ``(N,)``; ``labels``
    given means the category is given."""
    level = full_res_level(gm)
    td, cats, lj, masks = [], [], [], []
    for start in range(0, images.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        acts = backbone(images[sl])
        bu = {k: v for k, v in acts.items() if k in gm.hidden_levels}
        r = greedy_map(gm, bu, category=None if labels is None else labels[sl])
        td.append(r.td[level]), cats.append(r.assignment["category"]), lj.append(r.log_joint)
        masks.append(r.mask)
    return {"td": torch.cat(td), "mask": torch.cat(masks), "category": torch.cat(cats),
            "log_joint": torch.cat(lj)}  # fmt: skip


def tune_mask_threshold(
    gm: GenerativeModel,
    backbone: Backbone,
    objects: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    multipliers: Sequence[float] = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0),
    world: World = SINGLE_PROCESS,
) -> dict[float, float]:
    """Set the mask level's ``mask_threshold`` to the multiple of its λ with the best mean mask
    IoU on ``objects`` (validation objects, category given); returns multiplier → IoU.

    ``world``: under several processes ``objects`` is this rank's share; the IoU sums are
    all-reduced, so every rank picks the same multiplier."""
    images, masks, labels = objects
    level = full_res_level(gm)
    obs = gm.observations[level]
    lam = float(obs.threshold)
    peak = object_passes(gm, backbone, images, labels)["td"].amax(dim=-3)  # (N, H, W)
    sums = torch.stack([mask_iou(peak >= m * lam, masks).double().sum() for m in multipliers])
    sums = world.all_reduce_sum(torch.cat([sums, sums.new_tensor([images.shape[0]])]))  # (M+1,)
    n = float(sums[-1])
    scores = {float(m): float(sums[i]) / n for i, m in enumerate(multipliers)}
    best = max(scores, key=lambda m: (scores[m], -m))
    obs.mask_threshold.fill_(best * lam)
    return scores
