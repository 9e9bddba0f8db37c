"""Single rendered objects on a plain background, and datasets of them.

Everything but the shape is drawn from distributions shared by all categories: viewpoint
(azimuth uniform over the circle, elevation in [-15, 55] degrees), scale, position, light,
ambient level, part colours and background colour. So a classifier trained on these images
can only use shape.

Randomness: item ``i`` of ``RenderedObjects(category, n, seed=s)`` is drawn from a numpy
generator seeded with ``(s, crc32(category), i)``; it depends on nothing else, not on ``n``,
on other items, or on the order of access. Use different seeds for training and held-out sets.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pyro_backpass.data.checks import (
    check_category,
    check_count,
    check_range,
    check_seed,
    check_size,
)
from pyro_backpass.data.constants import CATEGORIES, DEFAULT_SIZE
from pyro_backpass.data.meshes import build_mesh, sample_shape
from pyro_backpass.data.render import Layer, render_mesh
from pyro_backpass.files import atomic_write

__all__ = [
    "OBJECT_SCALE",
    "ObjectDataset",
    "ObjectParams",
    "ObjectRender",
    "RenderedObjects",
    "render_object",
    "sample_object_params",
]

#: Default range of the object's bounding-sphere diameter, as a fraction of the image side.
OBJECT_SCALE: tuple[float, float] = (0.7, 0.95)
ELEVATION: tuple[float, float] = (-15.0, 55.0)
# Bump when rendering changes, so on-disk caches of older renders are not reused.
_RENDER_VERSION = 1

RGB = tuple[float, float, float]


@dataclass(frozen=True)
class Appearance:
    """Lighting and colours, drawn from one distribution for every category (and clutter)."""

    light: tuple[float, float]  # (azimuth, elevation) in degrees, camera frame
    ambient: float
    colours: tuple[RGB, RGB, RGB]  # primary, secondary, dark accent
    background: RGB


def _hsv(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> RGB:
    h, s, v = rng.uniform(0, 1), rng.uniform(*sat), rng.uniform(*val)
    return tuple(float(c) for c in colorsys.hsv_to_rgb(h, s, v))  # type: ignore[return-value]


def sample_appearance(rng: np.random.Generator, *, background: RGB | None = None) -> Appearance:
    """Draw light, colours and (unless given) a plain background colour."""
    bg = background if background is not None else _hsv(rng, (0.0, 0.25), (0.35, 0.95))
    # Keep the primary colour away from the background so the object does not vanish.
    for _ in range(20):
        primary = _hsv(rng, (0.25, 0.9), (0.4, 1.0))
        if np.abs(np.subtract(primary, bg)).max() > 0.25:
            break
    secondary = _hsv(rng, (0.1, 0.9), (0.3, 1.0))
    accent = _hsv(rng, (0.0, 0.3), (0.08, 0.3))
    light = (float(rng.uniform(-60, 60)), float(rng.uniform(10, 70)))
    return Appearance(
        light,
        float(rng.uniform(0.25, 0.5)),
        (primary, secondary, accent),
        tuple(float(c) for c in bg),
    )  # type: ignore[arg-type]


@dataclass(frozen=True)
class ObjectParams:
    """Everything that determines one rendered object.

    :param shape: the category's shape parameters (see :mod:`pyro_backpass.data.meshes`).
    :param azimuth: degrees, 0 sees the object's front. :param elevation: degrees.
    :param scale: bounding-sphere diameter as a fraction of the image side.
    :param centre: ``(row, col)`` of the object's centre in pixels (continuous).
    """

    category: str
    shape: Mapping[str, float]
    azimuth: float
    elevation: float
    scale: float
    centre: tuple[float, float]
    appearance: Appearance
    size: int


@dataclass(frozen=True)
class ObjectRender:
    """A rendered object: ``image`` ``(3, H, W)`` float32 in [0, 1], ``mask`` ``(H, W)`` bool
    (``alpha >= 0.5``), ``alpha`` ``(H, W)`` float32 coverage, and its ``params``."""

    image: torch.Tensor
    mask: torch.Tensor
    alpha: torch.Tensor
    params: ObjectParams


def sample_object_params(
    category: str,
    rng: np.random.Generator,
    *,
    size: int = DEFAULT_SIZE,
    scale: tuple[float, float] = OBJECT_SCALE,
    centre: tuple[float, float] | None = None,
    background: RGB | None = None,
) -> ObjectParams:
    """Draw an object's parameters; ``centre=None`` places it at random wholly inside the image."""
    check_category(category, CATEGORIES)
    shape = sample_shape(category, rng)
    az, el = float(rng.uniform(0, 360)), float(rng.uniform(*ELEVATION))
    f = float(rng.uniform(*scale))
    if centre is None:
        # The bounding circle (diameter f * size) stays in the frame; jitter half the slack.
        slack = 0.5 * (1 - f) * size / 2
        centre = tuple(float(size / 2 + rng.uniform(-slack, slack)) for _ in range(2))
    app = sample_appearance(rng, background=background)
    return ObjectParams(category, shape, az, el, f, centre, app, size)  # type: ignore[arg-type]


def render_layer(params: ObjectParams, *, supersample: int = 2) -> Layer:
    """The object of ``params`` as a layer (colour and soft coverage), not composited."""
    a = params.appearance
    return render_mesh(
        build_mesh(params.category, dict(params.shape)),
        size=params.size,
        azimuth=params.azimuth,
        elevation=params.elevation,
        scale=params.scale,
        centre=params.centre,
        light=a.light,
        ambient=a.ambient,
        colours=np.array(a.colours),
        supersample=supersample,
    )


def quantise(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` float in [0, 1] -> ``(3, H, W)`` float32 on 8-bit levels."""
    q = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return torch.from_numpy(q).permute(2, 0, 1).float().div_(255.0)


def render_object(params: ObjectParams, *, supersample: int = 2) -> ObjectRender:
    """Render ``params`` on its plain background."""
    layer = render_layer(params, supersample=supersample)
    size = params.size
    bg = np.broadcast_to(np.asarray(params.appearance.background), (size, size, 3))
    return ObjectRender(
        image=quantise(layer.over(bg)),
        mask=torch.from_numpy(layer.alpha >= 0.5),
        alpha=torch.from_numpy(layer.alpha.astype(np.float32)),
        params=params,
    )


def _rng(seed: tuple[int, ...], category: str, i: int) -> np.random.Generator:
    return np.random.default_rng([*seed, zlib.crc32(category.encode()), i])


class RenderedObjects(Dataset):
    """``n`` rendered objects of one category: ``[i] -> (image (3, H, W) float32 in [0, 1],
    mask (H, W) bool)``.

    :param category: one of :data:`CATEGORIES`.
    :param n: number of items.
    :param size: image side in pixels.
    :param seed: non-negative int (or tuple of them); item ``i`` depends only on
        ``(category, seed, i)`` (and ``size``, ``scale``).
    :param scale: range of the bounding-sphere diameter, as a fraction of ``size``.
    :param cache_dir: if given, items are stored there (8-bit PNG-like arrays in ``.npz``) on
        first access and read back after; the folder name encodes every option, so caches of
        different settings never mix.
    """

    def __init__(
        self,
        category: str,
        n: int,
        *,
        size: int = DEFAULT_SIZE,
        seed: int | tuple[int, ...] = 0,
        scale: tuple[float, float] = OBJECT_SCALE,
        cache_dir: str | Path | None = None,
        supersample: int = 2,
    ) -> None:
        self.category = check_category(category, CATEGORIES)
        self.n = check_count("n", n)
        self.size = check_size(size)
        self.seed = check_seed(seed)
        self.scale = check_range("scale", scale, lo=1e-3, hi=1.0)
        if self.scale[0] <= 0.0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.supersample = check_count("supersample", supersample, lo=1, hi=8)
        self.cache_dir: Path | None = None
        if cache_dir is not None:
            key = json.dumps([_RENDER_VERSION, self.size, self.seed, self.scale, supersample])
            digest = hashlib.sha1(key.encode()).hexdigest()[:10]
            self.cache_dir = Path(cache_dir) / f"{category}-{size}px-{digest}"

    def __len__(self) -> int:
        return self.n

    def _index(self, i: int) -> int:
        if isinstance(i, bool) or not isinstance(i, int | np.integer):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} items")
        return int(i) % self.n

    def params(self, i: int) -> ObjectParams:
        """The generating parameters of item ``i`` (cheap: nothing is rendered)."""
        rng = _rng(self.seed, self.category, self._index(i))
        return sample_object_params(self.category, rng, size=self.size, scale=self.scale)

    def render(self, i: int) -> ObjectRender:
        """Item ``i`` with its soft coverage and parameters (never cached)."""
        return render_object(self.params(i), supersample=self.supersample)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._index(i)
        path = None if self.cache_dir is None else self.cache_dir / f"{i:07d}.npz"
        if path is not None and path.exists():
            with np.load(path) as z:
                image = torch.from_numpy(z["image"]).float().div_(255.0)
                return image, torch.from_numpy(z["mask"])
        out = self.render(i)
        if path is not None:
            image_u8 = (out.image * 255).round().to(torch.uint8).numpy()

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, image=image_u8, mask=out.mask.numpy())

            atomic_write(path, write)
        return out.image, out.mask


class ObjectDataset(Dataset):
    """Rendered objects of several categories, for training a classifier:
    ``[i] -> (image (3, H, W) float32, mask (H, W) bool, label int)``.

    Item ``i`` is item ``i // K`` of ``RenderedObjects(categories[i % K], ..., seed=seed)``
    with ``K = len(categories)``, so classes are balanced and interleaved, and
    ``label = i % K`` indexes ``self.categories``.
    """

    def __init__(
        self,
        n: int,
        *,
        categories: Sequence[str] = CATEGORIES,
        size: int = DEFAULT_SIZE,
        seed: int | tuple[int, ...] = 0,
        scale: tuple[float, float] = OBJECT_SCALE,
        cache_dir: str | Path | None = None,
    ) -> None:
        self.n = check_count("n", n)
        categories = tuple(categories)
        if not categories:
            raise ValueError("categories must not be empty")
        if len(set(categories)) != len(categories):
            raise ValueError(f"categories must be distinct, got {categories}")
        self.categories = tuple(check_category(c, CATEGORIES) for c in categories)
        k = len(self.categories)
        per = -(-self.n // k)  # ceil
        self.parts = [
            RenderedObjects(c, per, size=size, seed=seed, scale=scale, cache_dir=cache_dir)
            for c in self.categories
        ]

    def __len__(self) -> int:
        return self.n

    def label(self, i: int) -> int:
        """The label of item ``i`` (an index into ``self.categories``)."""
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} items")
        return int(i % self.n) % len(self.categories)

    def params(self, i: int) -> ObjectParams:
        k = self.label(i)
        return self.parts[k].params(int(i % self.n) // len(self.categories))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        k = self.label(i)
        image, mask = self.parts[k][int(i % self.n) // len(self.categories)]
        return image, mask, k


def params_dict(params: ObjectParams) -> dict:
    """``params`` as plain JSON-able data."""
    return asdict(params)
