"""Fitting a :class:`~pyro_backpass.model.MaskReadout`: the object mask read from F̂ of a few
levels by a logistic filter, fitted on training objects (their rendered masks), its threshold
chosen on validation objects."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pyro_backpass.backbone import Backbone
from pyro_backpass.inference import greedy_map
from pyro_backpass.learning.evaluation import mask_iou
from pyro_backpass.levels import full_resolution_level
from pyro_backpass.model import GenerativeModel, MaskReadout

__all__ = ["DEFAULT_READOUT_LEVELS", "fit_mask_readout", "object_reconstructions"]

#: The levels read by default (those present in the model): the full-resolution level and the
#: two above it (on the default backbone's validation objects, adding ``pool2`` and ``conv3_1``
#: did not raise the IoU).
DEFAULT_READOUT_LEVELS = ("conv1_1", "pool1", "conv2_1")
_LOGIT_GRID = tuple(x / 4 for x in range(-12, 13))  # thresholds tried on the logits


@torch.no_grad()
def object_reconstructions(
    gm: GenerativeModel,
    backbone: Backbone,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    levels: Sequence[str],
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """F̂ of ``levels`` from the backward pass on each image's own activations, category given:
    ``{level: (N, C, H, W)}``."""
    out: dict[str, list[torch.Tensor]] = {n: [] for n in levels}
    for start in range(0, images.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        bu = {k: v for k, v in backbone(images[sl]).items() if k in gm.hidden_levels}
        td = greedy_map(gm, bu, category=labels[sl]).td
        for n in levels:
            out[n].append(td[n])
    return {n: torch.cat(v) for n, v in out.items()}


def fit_mask_readout(
    gm: GenerativeModel,
    backbone: Backbone,
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    validation: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    levels: Sequence[str] | None = None,
    kernel_size: int = 5,
    max_iter: int = 100,
    attach: bool = True,
) -> tuple[MaskReadout, dict[str, float]]:
    """Fit a mask readout of ``gm``'s F̂ and (with ``attach``) make it the model's mask.

    :param train, validation: ``(images (N, 3, H, W), masks (N, H, W) bool, labels (N,))``
        rendered objects alone; the filter is fitted on ``train`` (logistic loss, L-BFGS), its
        threshold on the logits chosen on ``validation`` (best mean mask IoU).
    :param levels: hidden levels to read (default: those of :data:`DEFAULT_READOUT_LEVELS` the
        model has, else its full-resolution level).
    :returns: the readout and ``{"validation_iou", "validation_iou_threshold_rule",
        "train_iou", "threshold"}`` (the rule: the model's ``mask_threshold`` on one level).
    """
    if levels is None:
        levels = [n for n in DEFAULT_READOUT_LEVELS if n in gm.hidden_levels]
        levels = levels or [full_resolution_level(gm.levels)]
    unknown = [n for n in levels if n not in gm.hidden_levels]
    if unknown:
        raise ValueError(f"mask readout: unknown levels {unknown}; hidden: {gm.hidden_levels}")
    for what, (images, masks, labels) in (("train", train), ("validation", validation)):
        if masks.dtype != torch.bool or masks.shape != images.shape[:1] + images.shape[2:]:
            raise ValueError(f"{what}: masks must be bool (N, H, W) matching the images, got "
                             f"{masks.dtype} {tuple(masks.shape)}")  # fmt: skip
        if labels.shape != images.shape[:1]:
            raise ValueError(f"{what}: need one label per image, got {tuple(labels.shape)}")
    specs = {s.name: s for s in gm.levels}
    full = specs[full_resolution_level(gm.levels)]
    readout = MaskReadout([specs[n] for n in levels], size=(full.height, full.width),
                          kernel_size=kernel_size).to(dtype=gm.dtype)  # fmt: skip
    td_train = object_reconstructions(gm, backbone, train[0], train[2], levels=levels)
    # Validation passes keep the rule's level too, for the rule's IoU beside the readout's.
    val_levels = list(dict.fromkeys([*levels, full.name]))
    td_val = object_reconstructions(gm, backbone, validation[0], validation[2], levels=val_levels)
    raw = readout.features(td_train)  # standardised with mean 0, scale 1: the raw features
    readout.mean.copy_(raw.mean(dim=(0, 2, 3)))
    readout.scale.copy_(raw.std(dim=(0, 2, 3)).clamp_min(1e-6))
    x = readout.features(td_train)  # (N, C, H, W)
    target = train[1].to(x.dtype)
    params = [readout.weight, readout.bias]
    opt = torch.optim.LBFGS(params, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = F.conv2d(x, readout.weight, readout.bias, padding=kernel_size // 2)[:, 0]
        loss = F.binary_cross_entropy_with_logits(logits, target)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        val_logits = readout.logits(td_val)
        ious = {t: float(mask_iou(val_logits > t, validation[1]).mean()) for t in _LOGIT_GRID}
        best = max(ious, key=lambda t: (ious[t], -abs(t)))
        readout.threshold.fill_(best)
        train_iou = float(mask_iou(readout(td_train), train[1]).mean())
        rule = td_val[full.name].amax(dim=-3) >= gm.observations[full.name].mask_threshold
    report = {
        "validation_iou": ious[best],
        "validation_iou_threshold_rule": float(mask_iou(rule, validation[1]).mean()),
        "train_iou": train_iou,
        "threshold": float(best),
    }
    readout.requires_grad_(False)
    if attach:
        gm.attach_mask_readout(readout)
    return readout, report
