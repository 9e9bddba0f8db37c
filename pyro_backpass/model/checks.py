"""Input checks shared by the model and the inference routines: clear errors at the boundary."""

from __future__ import annotations

import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from pyro_backpass.levels import LevelSpec

__all__ = [
    "ModelLike",
    "category_indices",
    "check_bu",
    "check_clamp",
    "check_observed",
    "merge_category",
]


class ModelLike(Protocol):
    """What the checks read of a :class:`~pyro_backpass.GenerativeModel` (which imports this
    module, so the checks name what they need instead of importing it)."""

    @property
    def levels(self) -> tuple[LevelSpec, ...]: ...
    @property
    def categories(self) -> tuple[str, ...]: ...
    @property
    def site_sizes(self) -> dict[str, int]: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def dtype(self) -> torch.dtype: ...


# Canonical level names (levels.py): a key of this form that the model lacks is a level of the
# backbone the model does not use, and is ignored; any other key is a mistake.
_CANONICAL = re.compile(r"image|category|conv[1-9][0-9]*_[1-9][0-9]*|pool[1-9][0-9]*")


def _device_check(name: str, x: torch.Tensor, gm: ModelLike) -> None:
    if x.device != gm.device:
        raise ValueError(
            f"{name} is on {x.device} but the model is on {gm.device}; move one of them "
            f"(e.g. gm.to({str(x.device)!r}))"
        )


def check_bu(
    gm: ModelLike, bu: Mapping[str, torch.Tensor] | None, *, batch_size: int | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """Validate ``bu`` (level name → ``(B, C, H, W)``), return the model's levels and ``B``.

    Canonical level names the model does not use are ignored (a backbone's
    :class:`~pyro_backpass.Activations` holds every level); any other key (a typo such as
    ``"pool_1"``) is an error. The ``image`` entry is raw RGB in [0, 1] by
    convention (a backbone's input) but is not range-checked here: the model's image level is
    Gaussian, and its own samples leave [0, 1]. ``category`` may be ``(B, N)`` or
    ``(B, N, 1, 1)`` and comes back as ``(B, N, 1, 1)``.
    """
    if bu is None:
        b = 1 if batch_size is None else int(batch_size)
        if b < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return {}, b
    if not isinstance(bu, Mapping):
        raise TypeError(f"bu must be a mapping level name -> tensor, got {type(bu).__name__}")
    out: dict[str, torch.Tensor] = {}
    sizes: dict[str, int] = {}
    specs = {s.name: s for s in gm.levels}
    unknown = [
        k for k in bu if k not in specs and not (isinstance(k, str) and _CANONICAL.fullmatch(k))
    ]
    if unknown:
        raise ValueError(
            f"bu has unknown level name(s) {unknown}; the model's levels are {list(specs)} "
            "(canonical names such as 'conv1_1', 'pool2' of levels it does not use are ignored)"
        )
    image = gm.levels[0]
    for name, x in bu.items():
        if name not in specs:
            continue
        spec = specs[name]
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"bu[{name!r}] must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"bu[{name!r}] must be a floating-point tensor, got {x.dtype}")
        if name == "category" and x.dim() == 2:
            x = x[..., None, None]
        if x.dim() != 4 or tuple(x.shape[1:]) != spec.shape:
            want = f"(B, {spec.channels})" if name == "category" else f"(B, {spec.channels}, "
            want += "" if name == "category" else f"{spec.height}, {spec.width})"
            hint = ""
            if x.dim() == 4 and x.shape[1] == spec.channels and name != "category":
                hint = (
                    f" — the model's levels are for {image.height}×{image.width}-pixel images; "
                    f"resize images to {image.height}×{image.width} before the backbone"
                )
            raise ValueError(f"bu[{name!r}] has shape {tuple(x.shape)}; expected {want}{hint}")
        # A finite sum proves every element finite; only an overflowing sum needs the full check.
        if not torch.isfinite(x.sum()) and not torch.isfinite(x).all():
            raise ValueError(f"bu[{name!r}] contains NaN or inf")
        _device_check(f"bu[{name!r}]", x, gm)
        out[name] = x if x.dtype == gm.dtype else x.to(gm.dtype)
        sizes[name] = x.shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(f"bu levels disagree on the batch size: {sizes}")
    if sizes and next(iter(sizes.values())) < 1:
        raise ValueError("bu has batch size 0: give at least one image")
    b = next(iter(sizes.values())) if sizes else (1 if batch_size is None else int(batch_size))
    if batch_size is not None and sizes and b != batch_size:
        raise ValueError(f"batch_size={batch_size} but bu has batch size {b}")
    return out, b


def check_observed(
    gm: ModelLike, observed: Mapping[str, Any] | None, bu: Mapping[str, torch.Tensor], b: int
) -> dict[str, torch.Tensor]:
    """``observed``: level name → bool mask broadcastable to ``(B, C, H, W)`` (or a bool)."""
    if observed is None:
        return {}
    if not isinstance(observed, Mapping):
        raise TypeError("observed must be a mapping level name -> bool mask (B, C, H, W)")
    names = {s.name for s in gm.levels}
    out = {}
    for name, mask in observed.items():
        if name not in names:
            raise ValueError(f"observed[{name!r}]: the model has no level {name!r}")
        if name not in bu:
            continue  # an unobserved level stays unobserved
        mask = torch.as_tensor(mask, device=gm.device)
        if mask.dtype != torch.bool:
            raise TypeError(f"observed[{name!r}] must be a bool mask, got {mask.dtype}")
        if name == "category" and mask.dim() == 2:
            mask = mask[..., None, None]  # (B, N) like bu['category']
        shape = tuple(bu[name].shape)
        try:
            fits = mask.dim() <= 4 and torch.broadcast_shapes(mask.shape, shape) == shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"observed[{name!r}] has shape {tuple(mask.shape)}; it must broadcast to "
                f"bu[{name!r}] {shape} without growing it, e.g. (B, 1, H, W) for a spatial mask"
            )
        out[name] = mask
    return out


def category_indices(gm: ModelLike, category: Any, b: int) -> torch.Tensor | None:
    """``category=``: a name, an index, or one per image → ``(B,)`` long indices, or None."""
    if category is None:
        return None
    items: Sequence[Any]
    if isinstance(category, torch.Tensor):
        if category.dim() > 1 or category.is_floating_point() or category.dtype == torch.bool:
            raise ValueError(
                f"category as a tensor must be 0-D or (B,) integer indices, got "
                f"{category.dtype} of shape {tuple(category.shape)}"
            )
        category = category.tolist()
    if isinstance(category, (str, numbers.Integral)):
        items = [category] * b
    elif isinstance(category, Sequence):
        items = list(category)
        if len(items) != b:
            raise ValueError(f"category has {len(items)} entries for {b} images")
    else:
        raise TypeError(
            f"category must be a name, an index or one per image, got {type(category).__name__}"
        )
    idx = []
    for item in items:
        if isinstance(item, str):
            if item not in gm.categories:
                raise ValueError(f"unknown category {item!r}; known: {list(gm.categories)}")
            idx.append(gm.categories.index(item))
        else:
            if isinstance(item, bool) or not isinstance(item, numbers.Integral):
                raise TypeError(f"category entries must be names or int indices, got {item!r}")
            i = int(item)
            if not 0 <= i < len(gm.categories):
                raise ValueError(f"category index {i} out of range [0, {len(gm.categories)})")
            idx.append(i)
    return torch.tensor(idx, dtype=torch.long, device=gm.device)


def check_clamp(gm: ModelLike, clamp: Mapping[str, Any] | None, b: int) -> dict[str, torch.Tensor]:
    """Site name → int or ``(B,)`` indices, checked against the site's size → ``(B,)`` long."""
    if clamp is None:
        return {}
    sizes = gm.site_sizes
    out = {}
    for site, value in clamp.items():
        if site not in sizes:
            raise ValueError(f"clamp: unknown site {site!r}; sites: {list(sizes)}")
        if site == "category":
            out[site] = category_indices(gm, value, b)
            continue
        v = torch.as_tensor(value, device=gm.device)
        if v.is_floating_point() or v.dtype == torch.bool:
            raise TypeError(f"clamp[{site!r}] must be integer indices, got {v.dtype}")
        v = v.long().expand(b) if v.dim() == 0 else v.long()
        if v.shape != (b,):
            raise ValueError(
                f"clamp[{site!r}] must be an int or shaped ({b},), got {tuple(v.shape)}"
            )
        if (v < 0).any() or (v >= sizes[site]).any():
            raise ValueError(f"clamp[{site!r}] out of range [0, {sizes[site]})")
        out[site] = v
    return out


def merge_category(gm: ModelLike, category: Any, clamp: Any, b: int) -> dict[str, torch.Tensor]:
    """``clamp`` checked, with ``category`` folded in as ``clamp['category']``."""
    clamps = check_clamp(gm, clamp, b)
    cat = category_indices(gm, category, b)
    if cat is not None:
        if "category" in clamps and not torch.equal(clamps["category"], cat):
            raise ValueError("category= and clamp['category'] disagree")
        clamps["category"] = cat
    return clamps
