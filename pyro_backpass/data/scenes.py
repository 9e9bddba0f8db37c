"""Cluttered scenes of several objects with instance masks, and a dataset of them.

A scene is a plain background, then background clutter (shapes of no category, never
instances), then the instances (targets and distractors) composited back to front. Every
instance is rendered once, alone, in the full frame; placements are integer shifts of that
render (plus its continuous sub-pixel offset, so positions are continuous), drawn until the
occlusions land in the requested range. Because shifting a render is cheap, many placements
can be tried without re-rendering.

Occlusion of an instance is ``1 - |visible| / |amodal|``: the fraction of its own (amodal)
mask hidden by instances in front of it. Clutter lies behind every instance, so it never
occludes one. The range ``occlusion=(lo, hi)`` asks that no instance be more than ``hi``
occluded and that the most occluded instance be at least ``lo`` occluded (the front-most
instance is never occluded, so asking every instance for ``lo > 0`` would be impossible).

Item ``i`` of ``Scenes(n, seed=s, ...)`` is ``make_scene(..., seed=(s, i))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
from pyro_backpass.data.clutter import random_clutter_mesh
from pyro_backpass.data.constants import CATEGORIES, DEFAULT_SIZE
from pyro_backpass.data.objects import (
    RGB,
    ObjectParams,
    quantise,
    render_layer,
    sample_appearance,
    sample_object_params,
)
from pyro_backpass.data.render import Layer, render_mesh

__all__ = [
    "Instance",
    "SCENE_SCALE",
    "Scene",
    "Scenes",
    "make_scene",
]

#: Default range of an instance's bounding-sphere diameter, as a fraction of the scene side:
#: small enough that 2-4 objects fit with modest occlusion.
SCENE_SCALE: tuple[float, float] = (0.4, 0.6)
CLUTTER_SCALE: tuple[float, float] = (0.15, 0.4)

Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Instance:
    """One object of a scene.

    :param mask: ``(H, W)`` bool, visible pixels (amodal minus instances in front).
    :param amodal_mask: ``(H, W)`` bool, the whole object as if nothing were in front.
    :param alpha: ``(H, W)`` float32 soft amodal coverage.
    :param occlusion: ``1 - |mask| / |amodal_mask|``.
    :param box: ``(y0, x0, y1, x1)`` of the *visible* mask, ends exclusive (slice bounds).
    :param amodal_box: the same for the amodal mask.
    :param image_alone: ``(3, H, W)`` the object alone at the same place on the scene's plain
        background (no clutter, no other objects): the masked object.
    :param depth: rank from the front (0 = nearest).
    :param is_target: a target (else a distractor).
    :param params: its generating parameters, ``centre`` in scene pixels.
    """

    category: str
    mask: torch.Tensor
    amodal_mask: torch.Tensor
    alpha: torch.Tensor
    occlusion: float
    box: Box
    amodal_box: Box
    image_alone: torch.Tensor
    depth: int
    is_target: bool
    params: ObjectParams


@dataclass(frozen=True)
class Scene:
    """A composited scene: ``image`` ``(3, H, W)`` float32 in [0, 1], its ``instances``
    (targets first, then distractors), the plain ``background`` colour and ``clutter_mask``
    ``(H, W)`` bool (visible clutter pixels)."""

    image: torch.Tensor
    instances: tuple[Instance, ...]
    background: RGB
    clutter_mask: torch.Tensor

    def object_alone(self, i: int) -> torch.Tensor:
        """``(3, H, W)``: instance ``i`` alone at its place on the plain background."""
        return self.instances[i].image_alone


def _bbox(mask: np.ndarray) -> Box:
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if len(rows) == 0:
        return (0, 0, 0, 0)
    return (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Move ``a`` (H, W, ...) by (dy, dx) pixels, filling with zeros (no wrap-around)."""
    out = np.zeros_like(a)
    h, w = a.shape[:2]
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = a[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _resolve_categories(
    targets: str | Sequence[str], distractors: int | Sequence[str], rng: np.random.Generator
) -> tuple[list[str], list[str]]:
    tgt = [targets] if isinstance(targets, str) else list(targets)
    if not 1 <= len(tgt) <= 4:
        raise ValueError(f"targets must name 1 to 4 objects, got {len(tgt)}")
    for c in tgt:
        check_category(c, CATEGORIES)
    if isinstance(distractors, int) and not isinstance(distractors, bool):
        check_count("distractors", distractors, lo=0, hi=4)
        others = [c for c in CATEGORIES if c not in tgt]
        if distractors and not others:
            raise ValueError("no distractor categories left: the targets use every category")
        dis = [str(c) for c in rng.choice(others, size=distractors)] if distractors else []
    else:
        dis = [distractors] if isinstance(distractors, str) else list(distractors)
        if len(dis) > 4:
            raise ValueError(f"distractors must be 0 to 4 objects, got {len(dis)}")
        for c in dis:
            check_category(c, CATEGORIES)
    return tgt, dis


def _occlusions(amodal: list[np.ndarray], order: np.ndarray) -> list[np.ndarray]:
    """Visible masks, given amodal masks and ``order`` (instance indices, front first)."""
    visible: list[np.ndarray] = [np.empty(0)] * len(amodal)
    covered = np.zeros_like(amodal[0])
    for k in order:
        visible[k] = amodal[k] & ~covered
        covered |= amodal[k]
    return visible


def _check_options(
    size: object, occlusion: object, scale: object, clutter: object, max_tries: object
) -> tuple[int, tuple[float, float], tuple[float, float], int | None]:
    size = check_size(size)
    occ = check_range("occlusion", occlusion, lo=0.0, hi=1.0, strict_hi=True)
    scale = check_range("scale", scale, lo=1e-3, hi=1.0)
    if scale[0] <= 0.0:
        raise ValueError(f"scale must be positive, got {scale}")
    n_clutter = None if isinstance(clutter, bool) else check_count("clutter", clutter, hi=50)
    check_count("max_tries", max_tries, lo=1)
    return size, occ, scale, n_clutter


def make_scene(
    *,
    targets: str | Sequence[str] = ("airplane", "airplane"),
    distractors: int | Sequence[str] = 2,
    clutter: bool | int = True,
    occlusion: tuple[float, float] = (0.0, 0.4),
    size: int = DEFAULT_SIZE,
    scale: tuple[float, float] = SCENE_SCALE,
    seed: int | tuple[int, ...] = 0,
    max_tries: int = 500,
) -> Scene:
    """Render one scene.

    :param targets: categories of the 1-4 target objects.
    :param distractors: 0-4 distractor objects: a count (categories drawn from those not among
        the targets) or a list of categories.
    :param clutter: background clutter: ``True`` for 3-6 shapes, ``False`` for none, or a count.
    :param occlusion: ``(lo, hi)``: no instance more than ``hi`` occluded, the most occluded
        at least ``lo`` (``0 <= lo <= hi < 1``).
    :param scale: range of each instance's bounding-sphere diameter, as a fraction of ``size``.
    :param seed: a non-negative int or tuple of them; the scene depends on nothing else.
    :param max_tries: placements drawn before giving up with a ``ValueError``.
    """
    size, (lo, hi), scale, n_clutter = _check_options(size, occlusion, scale, clutter, max_tries)
    rng = np.random.default_rng(list(check_seed(seed)))
    tgt, dis = _resolve_categories(targets, distractors, rng)
    cats = tgt + dis
    if lo > 0 and len(cats) < 2:
        raise ValueError(f"occlusion lower bound {lo} > 0 needs at least two objects")

    app = sample_appearance(rng)  # only its background is used: one per scene
    bg = app.background
    # Render each instance once at the frame centre plus a sub-pixel offset.
    params, layers = [], []
    for c in cats:
        centre = (size / 2 + float(rng.uniform()), size / 2 + float(rng.uniform()))
        p = sample_object_params(c, rng, size=size, scale=scale, centre=centre, background=bg)
        params.append(p)
        layers.append(render_layer(p))
    order = rng.permutation(len(cats))  # front to back
    amodal0 = [layer.alpha >= 0.5 for layer in layers]
    support = [_bbox(layer.alpha > 0) for layer in layers]  # keep all coverage in the frame

    for _ in range(max_tries):
        shifts = [
            (int(rng.integers(-y0, size - y1 + 1)), int(rng.integers(-x0, size - x1 + 1)))
            for (y0, x0, y1, x1) in support
        ]
        amodal = [_shift(m, dy, dx) for m, (dy, dx) in zip(amodal0, shifts, strict=True)]
        visible = _occlusions(amodal, order)
        occ = [1.0 - v.sum() / a.sum() for v, a in zip(visible, amodal, strict=True)]
        if max(occ) <= hi and max(occ) >= lo:
            break
    else:
        raise ValueError(
            f"could not place {len(cats)} objects with occlusion in [{lo}, {hi}] after "
            f"{max_tries} tries; widen the occlusion range, use fewer objects or a smaller scale"
        )

    background = np.broadcast_to(np.asarray(bg), (size, size, 3))
    image = background.copy()
    any_amodal = np.logical_or.reduce(amodal)
    clutter_cover = np.zeros((size, size), dtype=bool)
    count = int(rng.integers(3, 7)) if n_clutter is None and clutter else int(n_clutter or 0)
    for _ in range(count):
        cap = sample_appearance(rng, background=bg)
        layer = render_mesh(
            random_clutter_mesh(rng),
            size=size,
            azimuth=float(rng.uniform(0, 360)),
            elevation=float(rng.uniform(-15, 55)),
            scale=float(rng.uniform(*CLUTTER_SCALE)),
            centre=tuple(rng.uniform(0, size, 2)),
            light=cap.light,
            ambient=cap.ambient,
            colours=np.array(cap.colours),
        )
        image = layer.over(image)
        clutter_cover |= layer.alpha >= 0.5

    shifted = [
        Layer(_shift(layer.colour, dy, dx), _shift(layer.alpha, dy, dx))
        for layer, (dy, dx) in zip(layers, shifts, strict=True)
    ]
    for k in order[::-1]:  # back to front
        image = shifted[k].over(image)

    depth = np.empty(len(cats), dtype=np.int64)
    depth[order] = np.arange(len(cats))
    instances = []
    for k, c in enumerate(cats):
        p = params[k]
        moved = ObjectParams(
            p.category,
            p.shape,
            p.azimuth,
            p.elevation,
            p.scale,
            (p.centre[0] + shifts[k][0], p.centre[1] + shifts[k][1]),
            p.appearance,
            p.size,
        )
        instances.append(
            Instance(
                category=c,
                mask=torch.from_numpy(visible[k]),
                amodal_mask=torch.from_numpy(amodal[k]),
                alpha=torch.from_numpy(shifted[k].alpha.astype(np.float32)),
                occlusion=float(occ[k]),
                box=_bbox(visible[k]),
                amodal_box=_bbox(amodal[k]),
                image_alone=quantise(shifted[k].over(background)),
                depth=int(depth[k]),
                is_target=k < len(tgt),
                params=moved,
            )
        )
    return Scene(
        image=quantise(image),
        instances=tuple(instances),
        background=bg,
        clutter_mask=torch.from_numpy(clutter_cover & ~any_amodal),
    )


class Scenes(Dataset):
    """``n`` scenes; ``[i] -> Scene``, equal to ``make_scene(**options, seed=(seed, i))``.

    Scenes hold variable numbers of instances, so batch them with ``collate_fn=list`` (or
    stack ``scene.image`` yourself).
    """

    def __init__(self, n: int, *, seed: int | tuple[int, ...] = 0, **options: object) -> None:
        self.n = check_count("n", n)
        self.seed = check_seed(seed)
        self.options = options
        # Fail on bad options now, not at the first item.
        if "seed" in options:
            raise TypeError("pass seed as Scenes(seed=...), not as a scene option")
        known = set(make_scene.__kwdefaults__) - {"seed"}
        unknown = set(options) - known
        if unknown:
            raise TypeError(f"unknown scene options {sorted(unknown)}; known: {sorted(known)}")
        o = {**make_scene.__kwdefaults__, **options}
        _check_options(o["size"], o["occlusion"], o["scale"], o["clutter"], o["max_tries"])
        tgt, dis = _resolve_categories(o["targets"], o["distractors"], np.random.default_rng(0))
        if o["occlusion"][0] > 0 and len(tgt) + len(dis) < 2:
            raise ValueError("an occlusion lower bound > 0 needs at least two objects")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Scene:
        if isinstance(i, bool) or not isinstance(i, int | np.integer):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for {self.n} scenes")
        return make_scene(**self.options, seed=(*self.seed, int(i) % self.n))  # type: ignore[arg-type]
