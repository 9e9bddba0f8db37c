"""Images of any type, size and mode as the model's input: conversion to ``(3, H, W)`` float in
[0, 1], and the views of one scan over scales (resize, pad, slide windows).

Scale is not a hidden variable of the model (paper §3.3): the parser scans over it, each view
being one model-sized input, and compares hypotheses across views by their log-likelihood ratio
against background.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["View", "as_image", "make_views"]


def as_image(image: Any, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Any RGB, grey or RGBA image as ``(3, H, W)`` float in [0, 1].

    Accepts a PIL image (any mode), a numpy array or a tensor: ``(H, W)`` grey, ``(H, W, C)``
    or ``(C, H, W)`` with C in {1, 3, 4}; integer types are divided by their maximum (255 for
    uint8), floats must lie in [0, 1]. Alpha is composited over white.
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype == np.bool_:
            image = image.astype(np.float32)
        if np.issubdtype(image.dtype, np.integer):
            info = np.iinfo(image.dtype)
            image = image.astype(np.float64) / float(info.max if image.max() > 1 else 1)
        t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float64))
        channels_last = True
    elif isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if not t.is_floating_point():
            t = t.double() / (255.0 if t.dtype == torch.uint8 else float(max(int(t.max()), 1)))
        channels_last = False
    else:
        raise TypeError(f"image must be a PIL image, numpy array or tensor, got {type(image)}")
    if t.dim() == 2:
        t = t[None]
    elif t.dim() == 3:
        if channels_last and t.shape[-1] in (1, 3, 4):
            t = t.permute(2, 0, 1)
        elif t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
            t = t.permute(2, 0, 1)
    else:
        raise ValueError(f"image must be (H, W), (H, W, C) or (C, H, W), got {tuple(t.shape)}")
    if t.shape[0] not in (1, 3, 4):
        raise ValueError(f"image needs 1, 3 or 4 channels, got shape {tuple(t.shape)}")
    if min(t.shape[-2:]) < 1:
        raise ValueError(f"image is empty: shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("image has non-finite values")
    if t.min() < 0 or t.max() > 1:
        raise ValueError(
            f"a float image must lie in [0, 1], got [{float(t.min()):.3g}, {float(t.max()):.3g}]"
        )
    if t.shape[0] == 4:  # RGBA over white
        t = t[:3] * t[3:] + (1 - t[3:])
    elif t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t.to(dtype).contiguous()


@dataclass(frozen=True)
class View:
    """One model-sized input cut from the image at one scale.

    :ivar image: ``(3, S, S)`` the view.
    :ivar scale: the scan scale it belongs to (1.0: the whole image fits the input).
    :ivar factor: resized pixels per original pixel.
    :ivar origin: ``(y, x)`` of the view's top-left corner in resized pixels (negative where the
        view is padded).
    :ivar resized: ``(h, w)`` of the resized image.
    """

    image: torch.Tensor
    scale: float
    factor: float
    origin: tuple[int, int]
    resized: tuple[int, int]

    @property
    def size(self) -> int:
        return int(self.image.shape[-1])

    def box(self, height: int, width: int) -> tuple[float, float, float, float]:
        """The view's extent ``(y0, x0, y1, x1)`` as fractions of the original image."""
        s, (oy, ox) = self.size, self.origin
        return (
            oy / self.factor / height,
            ox / self.factor / width,
            (oy + s) / self.factor / height,
            (ox + s) / self.factor / width,
        )

    def to_image(self, x: torch.Tensor, height: int, width: int, *, fill: float = 0.0):
        """A view-space map ``(C, S, S)`` (or bool ``(S, S)``) in original image coordinates
        ``(C, H, W)`` (or ``(H, W)``), ``fill`` outside the view."""
        is_mask = x.dtype == torch.bool
        m = (x[None] if is_mask else x).to(torch.float32)  # (C, S, S)
        h, w = self.resized
        canvas = m.new_full((m.shape[0], h, w), float(fill))
        oy, ox = self.origin
        ys, xs = max(oy, 0), max(ox, 0)
        ye, xe = min(oy + self.size, h), min(ox + self.size, w)
        if ye > ys and xe > xs:
            canvas[:, ys:ye, xs:xe] = m[:, ys - oy : ye - oy, xs - ox : xe - ox]
        if (h, w) != (height, width):
            mode = "nearest" if is_mask else "bilinear"
            kw = {} if is_mask else {"align_corners": False}
            canvas = F.interpolate(canvas[None], size=(height, width), mode=mode, **kw)[0]
        return canvas[0] >= 0.5 if is_mask else canvas

    def from_image(self, mask: torch.Tensor) -> torch.Tensor:
        """An original-image bool mask ``(H, W)`` in view coordinates ``(S, S)`` (False where
        the view is padding)."""
        h, w = self.resized
        m = mask.to(torch.float32)[None, None]
        if tuple(mask.shape) != (h, w):
            m = F.interpolate(m, size=(h, w), mode="nearest")
        out = torch.zeros(self.size, self.size, dtype=torch.bool)
        oy, ox = self.origin
        ys, xs = max(oy, 0), max(ox, 0)
        ye, xe = min(oy + self.size, h), min(ox + self.size, w)
        if ye > ys and xe > xs:
            out[ys - oy : ye - oy, xs - ox : xe - ox] = m[0, 0, ys:ye, xs:xe] >= 0.5
        return out


def _fill_colour(image: torch.Tensor) -> torch.Tensor:
    """The median colour of the image's border ``(3, 1, 1)``: the padding (a plain background
    continues; on photos it is the least surprising colour)."""
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
    return border.median(dim=1).values[:, None, None]


def make_views(image: torch.Tensor, *, size: int, scales: Sequence[float]) -> list[View]:
    """The views of a scan: at scale ``s`` the image is resized so its longer side is
    ``round(s * size)`` px; if it then fits it is padded (centred) to ``size``², else cut into
    ``size``² windows with a stride of half a window (the last ones flush with the edge).

    ``image``: ``(3, H, W)`` in [0, 1]. A ``size``² image at scale 1.0 is its own single view.
    """
    if not scales:
        raise ValueError("scales must name at least one scale")
    h0, w0 = image.shape[-2:]
    fill = _fill_colour(image)
    views = []
    for s in scales:
        s = float(s)
        if not (math.isfinite(s) and 0 < s <= 16):
            raise ValueError(f"scales must be positive (at most 16), got {s}")
        factor = s * size / max(h0, w0)
        h, w = max(1, round(h0 * factor)), max(1, round(w0 * factor))
        resized = image
        if (h, w) != (h0, w0):
            resized = F.interpolate(
                image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True
            )[0].clamp(0, 1)

        def starts(n: int) -> list[int]:
            if n <= size:
                return [-((size - n) // 2)]  # centred padding
            stride = size // 2
            out = list(range(0, n - size, stride)) + [n - size]
            return sorted(set(out))

        for oy in starts(h):
            for ox in starts(w):
                view = fill.expand(3, size, size).clone()
                ys, xs = max(oy, 0), max(ox, 0)
                ye, xe = min(oy + size, h), min(ox + size, w)
                view[:, ys - oy : ye - oy, xs - ox : xe - ox] = resized[:, ys:ye, xs:xe]
                views.append(View(view, s, factor, (oy, ox), (h, w)))
    return views
