"""A colour-bilateral mean-field CRF on a pass's mask (an option after the backward pass).

The mask readout (:class:`~pyro_backpass.model.MaskReadout`) decides each pixel from a small
window of F̂ and the input's activations; in clutter its mask spills onto objects that touch
the found one (issue #10's ``refocus.py`` measured it: 1.9 × the object's area). This module
adds the classic fix of semantic segmentation, a fully connected binary CRF whose unary term is
the readout's logit and whose pairwise term rewards pixels that are near each other *and* of
similar colour for taking the same label (Krähenbühl & Koltun 2011, with one Gaussian kernel
over position and RGB colour), solved by a few rounds of parallel mean-field updates:

``q ← σ(u + w · K (2q − 1))``, ``K_ij = exp(−|p_i − p_j|² / 2s² − |c_i − c_j|² / 2t²)``,
``K_ii = 0``,

with ``u`` the logit minus the readout's threshold, ``s`` the ``spatial`` bandwidth in pixels,
``t`` the ``colour`` bandwidth in RGB units of [0, 1] and ``w`` the ``weight``; a pixel is the
object's where ``q > 0.5``. It is not part of the model's MAP (``log_joint`` knows nothing of
it) and changes only the returned mask. The defaults were chosen on rendered validation scenes
(``benchmarks/mask_crf.py``); its flat-coloured objects suit a tight colour bandwidth that real
photographs may not.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pyro_backpass.model import GenerativeModel
from pyro_backpass.results import MapResult

__all__ = ["MAX_CRF_PIXELS", "colour_crf", "crf_mask", "readout_unary", "refine_mask"]

#: The dense kernel holds (H·W)² floats: masks up to 96 × 96 pixels (340 MB in float32).
MAX_CRF_PIXELS = 96 * 96


def colour_crf(
    unary: torch.Tensor,
    image: torch.Tensor,
    *,
    spatial: float = 8.0,
    colour: float = 0.05,
    weight: float = 3.0,
    iterations: int = 5,
) -> torch.Tensor:
    """``(B, H, W)`` probabilities that each pixel is the object's, after ``iterations`` parallel
    mean-field updates of the module's CRF.

    :param unary: ``(B, H, W)`` log-odds of "the object's pixel" (a readout's logit minus its
        threshold).
    :param image: ``(B, 3, H, W)`` (or ``(3, H, W)`` shared by every mask: its kernel is
        built once and the masks updated together) RGB in [0, 1].
    """
    if unary.dim() != 3:
        raise ValueError(f"unary must be (B, H, W), got {tuple(unary.shape)}")
    b, h, w = unary.shape
    shared = image.dim() == 3  # one image for every mask: one kernel, the masks batched
    if shared:
        image = image[None]
    if image.dim() != 4 or image.shape[1] != 3 or tuple(image.shape[2:]) != (h, w):
        raise ValueError(f"image must be (B, 3, {h}, {w}) or (3, {h}, {w}) to match the mask, "
                         f"got {tuple(image.shape)}")  # fmt: skip
    if not shared and image.shape[0] != b:
        raise ValueError(f"image has {image.shape[0]} images for {b} masks")
    if h * w > MAX_CRF_PIXELS:
        raise ValueError(f"colour_crf's dense kernel supports masks of up to {MAX_CRF_PIXELS} "
                         f"pixels, got {h} × {w}")  # fmt: skip
    for name, value in (("spatial", spatial), ("colour", colour)):
        if not value > 0:
            raise ValueError(f"{name} bandwidth must be > 0, got {value!r}")
    if (
        not weight >= 0
        or isinstance(iterations, bool)
        or not isinstance(iterations, int)
        or (iterations < 0)
    ):
        raise ValueError(f"weight must be >= 0 and iterations >= 0, got {weight!r}, {iterations!r}")
    if not bool(torch.isfinite(unary).all()) or not bool(torch.isfinite(image).all()):
        raise ValueError("colour_crf: unary and image must be finite")
    dtype = torch.promote_types(unary.dtype, torch.float32)
    ys, xs = torch.meshgrid(torch.arange(h, device=unary.device),
                            torch.arange(w, device=unary.device), indexing="ij")  # fmt: skip
    pos = torch.stack([ys.flatten(), xs.flatten()], dim=1).to(dtype)  # (N, 2)
    near = torch.cdist(pos, pos).square_() / (2 * spatial**2)  # (N, N)
    u = unary.to(dtype).flatten(1).T  # (N, B)
    images = image.to(dtype).flatten(2)  # (B or 1, 3, N)
    columns = [slice(None)] if shared else [slice(i, i + 1) for i in range(b)]
    out = []
    for cols, img in zip(columns, images, strict=True):
        rgb = img.T  # (N, 3)
        kernel = torch.exp(-(near + torch.cdist(rgb, rgb).square_() / (2 * colour**2)))
        kernel.fill_diagonal_(0.0)
        q = torch.sigmoid(u[:, cols])  # (N, B) shared, else (N, 1)
        for _ in range(iterations):
            q = torch.sigmoid(u[:, cols] + weight * (kernel @ (2 * q - 1)))
        out.append(q.T)
    return torch.cat(out).view(b, h, w)


def readout_unary(
    gm: GenerativeModel,
    td: Mapping[str, torch.Tensor],
    bu: Mapping[str, torch.Tensor] | None = None,
    observed: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(B, H, W)``: the CRF's unary term, the model's mask readout's logits of F̂ ``td`` (and
    ``bu``, if it ``reads_input``) minus its threshold (> 0 where the readout's mask is on)."""
    readout = getattr(gm, "mask_readout", None)
    if readout is None:
        raise ValueError(
            "refine_mask needs a model with a mask readout (its logits are the CRF's unary "
            "term); this model's mask is the threshold rule"
        )
    return readout.logits(td, bu, observed) - readout.threshold


@torch.no_grad()
def crf_mask(
    gm: GenerativeModel,
    td: Mapping[str, torch.Tensor],
    bu: Mapping[str, torch.Tensor] | None,
    image: torch.Tensor,
    *,
    observed: Mapping[str, torch.Tensor] | None = None,
    spatial: float = 8.0,
    colour: float = 0.05,
    weight: float = 3.0,
    iterations: int = 5,
) -> torch.Tensor:
    """``(B, H, W)`` bool: the mask of F̂ ``td`` refined by :func:`colour_crf` on ``image``,
    the unary term :func:`readout_unary` (what :func:`refine_mask` does for a pass's result;
    the parser calls it on each found instance's F̂)."""
    unary = readout_unary(gm, td, bu, observed)
    return colour_crf(unary, image.to(unary.device), spatial=spatial, colour=colour,
                      weight=weight, iterations=iterations) > 0.5  # fmt: skip


def refine_mask(
    gm: GenerativeModel,
    result: MapResult,
    bu: Mapping[str, torch.Tensor],
    image: torch.Tensor,
    *,
    observed: Mapping[str, torch.Tensor] | None = None,
    spatial: float = 8.0,
    colour: float = 0.05,
    weight: float = 3.0,
    iterations: int = 5,
) -> torch.Tensor:
    """``(B, H, W)`` bool: ``result``'s mask refined by :func:`colour_crf`, the model's mask
    readout's logits (of ``result.td`` and ``bu``) as the unary term.

    :param result: a backward pass of ``bu`` (:func:`~pyro_backpass.greedy_map`,
        :func:`~pyro_backpass.verified_map`, …).
    :param bu: the activations that pass explained (the readout reads them if it
        ``reads_input``).
    :param image: ``(B, 3, H, W)`` or ``(3, H, W)``, the RGB input in [0, 1] at the mask's size.
    :param observed: as given to the pass.

    Example::

        gm = GenerativeModel.default()
        scene = make_scene(seed=3)
        bu = gm.backbone(scene.image[None])
        result = greedy_map(gm, bu, category="airplane")
        mask = refine_mask(gm, result, bu, scene.image)  # (1, 64, 64)
    """
    return crf_mask(gm, result.td, bu, image, observed=observed, spatial=spatial,
                    colour=colour, weight=weight, iterations=iterations)  # fmt: skip
