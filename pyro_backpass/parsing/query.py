"""Top-down queries of a scene parse: priors and clamps on the model's hidden variables, chosen
per call, with no retraining (paper §1 queries 1-3 and §3.2).

A :class:`Query` says what to look for; :func:`resolve_query` turns it into the arguments of
the backward pass (``category=``, ``priors=``) and the parser's own choices (a preference over
the posterior modes, an occluder, imagination).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from pyro_backpass.model.checks import category_indices
from pyro_backpass.model.priors import CategoricalPrior, SitePrior

if TYPE_CHECKING:
    from pyro_backpass.model.generative_model import GenerativeModel

__all__ = [
    "LOCATIONS",
    "LogLinearPrior",
    "PREFERENCES",
    "Query",
    "class_map_prior",
    "location_prior",
    "top_centre",
]

#: Named locations, as (y, x) fractions of the image.
LOCATIONS: dict[str, tuple[float, float]] = {
    "left": (0.5, 0.0),
    "right": (0.5, 1.0),
    "top": (0.0, 0.5),
    "bottom": (1.0, 0.5),
    "centre": (0.5, 0.5),
    "center": (0.5, 0.5),
}
#: Preferences over the posterior modes of a step.
PREFERENCES = ("largest", "smallest", "leftmost", "rightmost", "topmost", "darkest", "brightest")


@dataclass(frozen=True)
class Query:
    """What a parse should look for; every field is optional and they combine.

    :param category: attend to one category (a name or index): the top level is clamped to it.
    :param categories: a distribution over categories, name → weight (normalised; categories
        left out get probability 0): a prior on the ``category`` site.
    :param location: a location preference, ``(y, x)`` as fractions of the image (0 = top or
        left edge) or a name in :data:`LOCATIONS` (``"left"``, ...): a prior on the top pooled
        level's offset δ, ``log P(δ) = −location_weight · d²`` with ``d`` the distance in top-level
        cells between the hypothesis's object centre and the preferred place.
    :param location_weight: nats per squared top-level cell. The data terms of one hypothesis
        differ by hundreds to thousands of nats between modes, so a weak prior only breaks
        near-ties; the default is strong enough to act as a ranking of places.
    :param prefer: a preference over the posterior modes of each step (``"largest"``,
        ``"leftmost"``, ``"darkest"``, ... see :data:`PREFERENCES`): among the step's top-k
        hypotheses that pass the stop criterion, the one that is most so is taken, so the parse
        lists objects in that order.
    :param occluder: ``(H, W)`` bool mask in image space of pixels hidden by an occluder: the
        elements of each level that the occluder dominates (its pooled cover ≥ 0.5) are marked
        unobserved, and each instance's :attr:`~ParsedInstance.amodal_mask` is its completion.
    :param imagine: return the best instance even when the stop criterion rejects it (with
        ``category``: "imagine an airplane in this cloud"); the parse then has one instance
        and ``stop_reason == "imagined"``.
    """

    category: str | int | None = None
    categories: Mapping[str, float] | None = None
    location: tuple[float, float] | str | None = None
    location_weight: float = 1000.0
    prefer: str | None = None
    occluder: Any = None
    imagine: bool = False

    def __post_init__(self) -> None:
        if self.prefer is not None and self.prefer not in PREFERENCES:
            raise ValueError(f"prefer={self.prefer!r}; choose one of {list(PREFERENCES)}")
        if isinstance(self.location, str) and self.location not in LOCATIONS:
            raise ValueError(f"location={self.location!r}; named places: {list(LOCATIONS)}")
        if self.location is not None and not isinstance(self.location, str):
            loc = tuple(self.location)
            if len(loc) != 2 or not all(math.isfinite(float(v)) for v in loc):
                raise ValueError(f"location must be (y, x) fractions, got {self.location!r}")
        if not (math.isfinite(self.location_weight) and self.location_weight >= 0):
            raise ValueError(f"location_weight must be finite and >= 0, got {self.location_weight}")
        if self.category is not None and self.categories is not None:
            raise ValueError("give category= (a clamp) or categories= (a prior), not both")

    @property
    def place(self) -> tuple[float, float] | None:
        """The preferred location as ``(y, x)`` fractions, or None."""
        if self.location is None:
            return None
        if isinstance(self.location, str):
            return LOCATIONS[self.location]
        return (float(self.location[0]), float(self.location[1]))

    def category_prior(self, gm: GenerativeModel) -> SitePrior | None:
        """The prior on ``category`` of ``categories=``, or None."""
        if self.categories is None:
            return None
        unknown = [c for c in self.categories if c not in gm.categories]
        if unknown:
            raise ValueError(f"categories {unknown} unknown; the model knows {gm.categories}")
        probs = [float(self.categories.get(c, 0.0)) for c in gm.categories]
        return CategoricalPrior(torch.tensor(probs, dtype=gm.dtype)).to(gm.device)


def top_centre(gm: GenerativeModel) -> tuple[float, float]:
    """Mean centre of mass ``(y, x)``, in top-level cells, of the top level's templates
    (relu(T[c, γ]) summed over channels) at δ = (0, 0): where an unshifted object sits."""
    top = gm.hidden_levels[-1]
    w = F.relu(gm.steps[top].weight.detach()).sum(dim=-3)  # (N, K, h, w)
    h, wd = w.shape[-2:]
    ys = torch.arange(h, dtype=w.dtype, device=w.device)[:, None]
    xs = torch.arange(wd, dtype=w.dtype, device=w.device)[None, :]
    mass = w.sum(dim=(-2, -1)).clamp_min(1e-12)
    cy = ((w * ys).sum(dim=(-2, -1)) / mass).mean()
    cx = ((w * xs).sum(dim=(-2, -1)) / mass).mean()
    return float(cy), float(cx)


def location_prior(
    gm: GenerativeModel, place: tuple[float, float], *, weight: float, view_box=None
) -> SitePrior:
    """The prior on ``delta_<top>`` that prefers objects near ``place`` (fractions of the
    image; ``view_box`` maps image fractions into one view's fractions: ``(y0, x0, y1, x1)``,
    the view's extent in image fractions, default the whole image)."""
    top = gm.hidden_levels[-1]
    spec = next(s for s in gm.levels if s.name == top)
    y, x = place
    if view_box is not None:
        y0, x0, y1, x1 = view_box
        y, x = (y - y0) / max(y1 - y0, 1e-9), (x - x0) / max(x1 - x0, 1e-9)
    cy, cx = top_centre(gm)
    # Place in top-level cells (cell centres at i + 0.5 in fractions * size).
    ty, tx = y * spec.height - 0.5, x * spec.width - 0.5
    offsets = torch.tensor(gm.offsets[top], dtype=gm.dtype, device=gm.device)  # (D, 2)
    d2 = (offsets[:, 0] + cy - ty) ** 2 + (offsets[:, 1] + cx - tx) ** 2
    return LogLinearPrior(-weight * d2)


def class_map_prior(
    gm: GenerativeModel, acts: Mapping[str, torch.Tensor], category: Any, *, weight: float
) -> LogLinearPrior:
    """A prior on ``delta_<top>`` from the backbone's class activation map (issue #10, lever 3):
    log-weight ``weight ×`` the category's per-cell logit (``Backbone.cell_logits``) at the
    cell where an object shifted by δ is centred (:func:`top_centre` + δ, rounded; outside the
    map, the map's minimum). Useful with a backbone whose class map localises objects,
    ``Backbone.default(localised=True)``; pass it as ``priors={f"delta_{top}": prior}``.

    :param acts: the backbone's activations of **one** image (``gm.backbone(image[None])``).
    :param category: a category name or index of the model.
    """
    if gm.backbone is None:
        raise ValueError("class_map_prior needs the model's backbone (gm.backbone is None)")
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"weight must be a finite number >= 0, got {weight}")
    top = gm.hidden_levels[-1]
    if top not in acts or acts[top].shape[0] != 1:
        got = tuple(acts[top].shape) if top in acts else "missing"
        raise ValueError(f"acts must hold one image's activations at {top!r}; got {got}")
    cells = gm.backbone.cell_logits(acts)  # (1, N, h, w) at the backbone's last level
    if cells.shape[-2:] != acts[top].shape[-2:]:
        raise ValueError(
            f"the model's top level {top!r} is not the backbone's last level, where the class "
            "map is"
        )
    if category is None:
        raise ValueError("class_map_prior needs a category (a name or an index)")
    (k,) = category_indices(gm, category, 1).tolist()
    cam = cells[0, k].detach().to(gm.dtype)  # (h, w)
    cy, cx = top_centre(gm)
    h, w = cam.shape
    offsets = torch.tensor(gm.offsets[top], device=cam.device)  # (D, 2)
    y, x = (cy + offsets[:, 0]).round().long(), (cx + offsets[:, 1]).round().long()
    inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
    logits = torch.where(inside, cam[y.clamp(0, h - 1), x.clamp(0, w - 1)], cam.min())
    return LogLinearPrior(weight * logits)


class LogLinearPrior(SitePrior):
    """A prior over one site from unnormalised log-weights ``(size,)``: ``log_softmax`` of them
    (kept in log space, so strong preferences do not underflow to probability 0)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        if logits.dim() != 1 or not torch.isfinite(logits).all():
            raise ValueError("LogLinearPrior takes finite 1-D log-weights")
        self.register_buffer("logits", logits)

    def log_probs(self) -> torch.Tensor:
        return torch.log_softmax(self.logits, dim=-1)
