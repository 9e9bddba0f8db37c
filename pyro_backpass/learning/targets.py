"""Top-down targets F_td: a backbone's activations of one object, masked to the object.

The paper computes F_td "by applying the CNN to the masked object instances" (§2.1). Raw
activations of an object on its plain background also light up the background around it at
low levels (the feasibility run of the learning issue: mask IoU 0.12 at ``conv1_1``), so every
level is multiplied by the object's mask max-pooled to that level's grid: a cell is kept when
any pixel it pools from belongs to the object.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from pyro_backpass.backbone import Backbone

__all__ = ["masked_activations", "max_pool_mask"]


def max_pool_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, H, W)`` bool → ``(B, h, w)`` bool: a cell is True when any pixel under it is.

    Cells are ``H // h`` by ``W // w`` pixels, trailing rows and columns dropped, as VGG's
    floor-mode pools drop them.
    """
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a (B, H, W) bool tensor, got {mask.dtype} {tuple(mask.shape)}"
        )
    h, w = size
    big_h, big_w = mask.shape[-2:]
    fh, fw = big_h // h, big_w // w
    if fh < 1 or fw < 1:
        raise ValueError(f"cannot pool a {big_h}x{big_w} mask to {h}x{w}")
    m = mask[:, : h * fh, : w * fw].unsqueeze(1).to(torch.float32)  # (B, 1, H', W')
    return F.max_pool2d(m, (fh, fw)).squeeze(1) > 0  # (B, h, w)


@torch.no_grad()
def masked_activations(
    backbone: Backbone,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    acts: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """F_td of each object: level → ``backbone(images)[level] × max_pool_mask(masks)``.

    :param images: ``(B, 3, H, W)`` each object alone (on its plain background).
    :param masks: ``(B, H, W)`` bool, the object's pixels.
    :param acts: the backbone's activations of ``images`` if already computed.
    :returns: every level of the backbone (``image`` included), ``(B, C, h, w)`` each.
    """
    if images.dim() != 4 or masks.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(
            f"images (B, 3, H, W) and masks (B, H, W) must agree, got {tuple(images.shape)} "
            f"and {tuple(masks.shape)}"
        )
    if acts is None:
        acts = backbone(images)
    out = {}
    for name, x in acts.items():
        keep = max_pool_mask(masks, tuple(x.shape[-2:]))  # (B, h, w)
        out[name] = x * keep.unsqueeze(1).to(x.dtype)
    return out
