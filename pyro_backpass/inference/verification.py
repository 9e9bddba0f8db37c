"""The backward pass with a learned choice among its completed descents (issue #10).

:func:`verified_map` completes greedy's ``top_k`` best top-level hypotheses down to the image
(as ``greedy_map(top_k=k)`` does) and keeps the one a
:class:`~pyro_backpass.model.DescentVerifier` scores highest, from :func:`descent_features`.
Where the model's own score prefers clutter, this choice is made by a function fitted to pick
the descents that cover an object (:func:`~pyro_backpass.learning.fit_descent_verifier`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from pyro_backpass.inference.background import background_log_likelihood
from pyro_backpass.inference.greedy import greedy_map
from pyro_backpass.inference.objective import object_mask, top_down_pass
from pyro_backpass.model.checks import category_indices, check_bu, check_observed
from pyro_backpass.model.descent_verifier import DescentVerifier
from pyro_backpass.model.generative_model import backbone_fingerprint
from pyro_backpass.results import MapResult

if TYPE_CHECKING:
    from pyro_backpass.model.generative_model import GenerativeModel
    from pyro_backpass.model.priors import SitePrior

__all__ = [
    "READ_LEVELS",
    "check_verifier",
    "default_verifier",
    "descent_features",
    "mode_values",
    "region_views",
    "verified_map",
    "verifier_fingerprint",
]

#: The backbone levels whose activations of a descent's region are features (the top three
#: of the default backbone; levels a backbone lacks are skipped).
READ_LEVELS: tuple[str, ...] = ("pool3", "conv4_1", "pool4")
_GROUP = 64  # masked images per backbone call


def region_views(image: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(k, 3, H, W)``: the ``image`` ``(3, H, W)`` shown only inside each of ``masks``
    ``(k, H, W)``; outside, each channel's (lower) median over the image (a stand-in for its plain
    background, estimated from the image alone)."""
    fill = image.flatten(1).median(1).values[:, None, None]  # (3, 1, 1)
    m = masks[:, None].to(image.dtype)  # (k, 1, H, W)
    return image[None] * m + fill[None] * (1 - m)


def mode_values(
    modes: Sequence[tuple[Mapping[str, int], float]], sites: Sequence[str], *, device=None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One image's ``modes`` (:attr:`MapResult.modes` ``[i]``: k (assignment, log-joint) pairs)
    as :func:`descent_features` takes them: every site in ``sites`` → ``(k,)`` indices, and the
    ``(k,)`` float64 log-joints."""
    values = {s: torch.tensor([a[s] for a, _ in modes], device=device) for s in sites}
    return values, torch.tensor([v for _, v in modes], dtype=torch.float64)


@torch.no_grad()
def descent_features(
    gm: GenerativeModel,
    bu: Mapping[str, torch.Tensor],
    values: Mapping[str, torch.Tensor],
    log_joints: torch.Tensor,
    *,
    read_levels: Sequence[str] = READ_LEVELS,
    observed: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(k, F)`` of ``k`` completed descents of one image, and their masks
    ``(k, H, W)``.

    :param bu: level → ``(1, C, H, W)``, one image; its ``image`` level is required.
    :param values: every site → ``(k,)`` indices: the k full assignments.
    :param log_joints: ``(k,)`` their log-joints (as :attr:`MapResult.modes` gives them).
    :param read_levels: backbone levels read (those in ``bu``).

    The columns, in order: each hidden level's log-likelihood ratio against the all-background
    explanation (its data score minus the level's :func:`background_log_likelihood`; top level
    first), the prior terms (log-joint minus the data scores), ``log(1 + mask pixels)``; then
    from :func:`region_views` of the descent's *seen* region (its mask, less the pixels whose
    image-level elements are unobserved in any channel: an occluder, or objects a parse has
    already explained away) on the image level clipped to [0, 1], through ``gm.backbone``: the
    classifier's log-probabilities of every category (if the backbone has a head) and the
    spatial mean of each read level; last, the mean of each read level's bottom-up activations
    over the seen region (pooled to the level's resolution).
    """
    bu, b = check_bu(gm, bu)
    if b != 1:
        raise ValueError(f"descent_features takes one image (batch 1), got batch {b}")
    if "image" not in bu:
        raise ValueError("descent_features needs the image level in bu (the region views)")
    if gm.backbone is None:
        raise ValueError("descent_features needs the model's backbone (gm.attach_backbone)")
    missing = [n for n in gm.hidden_levels if n not in bu]
    if missing:
        raise ValueError(f"descent_features needs every hidden level in bu; missing {missing}")
    masks_obs = check_observed(gm, observed, bu, b)
    k = int(log_joints.shape[0])
    if log_joints.dim() != 1 or any(v.shape != (k,) for v in values.values()):
        raise ValueError(f"values must map every site to ({k},) indices, one per log-joint; got "
                         f"{ {s: tuple(v.shape) for s, v in values.items()} }")  # fmt: skip
    rep = {name: x.expand(k, *x.shape[1:]) for name, x in bu.items()}
    rep_masks = {name: m.expand(bu[name].shape).expand(k, *bu[name].shape[1:])
                 for name, m in masks_obs.items()}  # fmt: skip
    td, scores = top_down_pass(gm, values, rep, rep_masks)  # scores: top level first
    masks = object_mask(gm, td)  # (k, H, W)
    data = torch.stack(scores, 1)  # (k, L)
    bg = torch.cat(
        [
            background_log_likelihood(
                gm,
                {name: bu[name]},
                observed=({name: masks_obs[name]} if name in masks_obs else None),
            )
            for name in reversed(gm.hidden_levels)
        ]
    )  # (L,) fmt: skip
    llr = data - bg[None].to(data)
    prior = log_joints.to(data) - data.sum(1)
    area = masks.flatten(1).sum(1).to(data.dtype).log1p()
    levels = [n for n in read_levels if n in bu]
    region = masks
    if "image" in masks_obs:  # pixels unobserved in any channel are not the descent's to show
        pixel_seen = masks_obs["image"].expand(bu["image"].shape)[0].all(dim=0)  # (H, W)
        region = masks & pixel_seen.to(masks.device)
    views = region_views(bu["image"][0].clamp(0, 1), region)  # clipped: the backbone's range
    seen, logp = [], []
    bb_dtype = gm.backbone.mean.dtype
    for start in range(0, k, _GROUP):
        acts = gm.backbone(views[start : start + _GROUP].to(dtype=bb_dtype))
        seen.append(torch.cat([acts[n].mean((2, 3)) for n in levels], 1))
        if gm.backbone.head is not None:
            logp.append(torch.log_softmax(gm.backbone.logits(acts), -1))
    m = region[:, None].to(data.dtype)
    under = []
    for name in levels:
        x = bu[name]
        w = torch.nn.functional.adaptive_avg_pool2d(m, x.shape[-2:])  # (k, 1, h, w)
        under.append((x.to(data) * w).sum((2, 3)) / w.sum((2, 3)).clamp_min(1e-3))
    feats = [llr, prior[:, None], area[:, None], *([torch.cat(logp).to(data)] if logp else []),
             torch.cat(seen).to(data), *under]  # fmt: skip
    return torch.cat(feats, 1), masks


def verifier_fingerprint(gm: GenerativeModel) -> str:
    """SHA-256 of what a verifier's features depend on: the generative model's parameters and
    its backbone's (which makes 389 of the 400 features)."""
    backbone = "" if gm.backbone is None else backbone_fingerprint(gm.backbone)
    return hashlib.sha256(f"{backbone_fingerprint(gm)}:{backbone}".encode()).hexdigest()


def default_verifier(gm: GenerativeModel) -> DescentVerifier:
    """The shipped :class:`DescentVerifier` when ``gm`` (and its backbone) is the model it was
    fitted for; otherwise a ValueError that says how to fit one."""
    shipped = DescentVerifier.shipped()
    if shipped is not None and shipped.model_sha256 == verifier_fingerprint(gm):
        return shipped
    raise ValueError(
        "no descent verifier was fitted for this model (the shipped one belongs to "
        "GenerativeModel.default()): fit one with pyro_backpass.fit_descent_verifier(gm, "
        "scenes) and pass verifier="
    )


def check_verifier(gm: GenerativeModel, verifier: object) -> None:
    """A clear error unless ``verifier`` is a :class:`DescentVerifier` for ``gm``: the same
    categories and, when it records one, the same model and backbone fingerprint."""
    if not isinstance(verifier, DescentVerifier):
        raise TypeError(f"verifier must be a DescentVerifier, got {type(verifier).__name__}")
    if tuple(verifier.categories) != tuple(gm.categories):
        raise ValueError(f"the verifier's categories {list(verifier.categories)} are not the "
                         f"model's {list(gm.categories)}")  # fmt: skip
    if verifier.model_sha256 is not None and verifier.model_sha256 != verifier_fingerprint(gm):
        raise ValueError(
            "the verifier was fitted for another model or backbone (its fingerprint differs); "
            "fit one for this model with fit_descent_verifier(gm, scenes)"
        )


def verified_map(
    gm: GenerativeModel,
    bu: Mapping[str, torch.Tensor],
    *,
    category: Any,
    verifier: DescentVerifier | None = None,
    clamp: Mapping[str, Any] | None = None,
    priors: Mapping[str, SitePrior] | None = None,
    observed: Mapping[str, torch.Tensor] | None = None,
    top_k: int | None = None,
) -> MapResult:
    """The backward pass whose top-level choice is made by a learned verifier.

    Greedy's ``top_k`` best top-level hypotheses (``verifier.top_k`` if None) of the clamped
    ``category`` are each completed down to the image, exactly as
    ``greedy_map(..., top_k=k)``; the one the ``verifier`` scores highest from its
    :func:`descent_features` is returned. This is **not** the model's MAP (that is
    :func:`~pyro_backpass.greedy_map`'s): ``log_joint`` is the chosen descent's own and
    ``modes`` lists the k descents in the verifier's order, each with its log-joint.

    :param category: required (a name, an index or one per image): the verifier scores the
        descents of one category with that category's weights (linear or an ensemble).
    :param verifier: None: the shipped one when ``gm`` is ``GenerativeModel.default()``.
    :param clamp, priors, observed: as in :func:`~pyro_backpass.greedy_map`.

    Example::

        gm = GenerativeModel.default()
        scene = make_scene(seed=3)
        bu = gm.backbone(scene.image[None])
        result = verified_map(gm, bu, category="airplane")
        result.mask  # (1, 64, 64): the verified descent's mask
    """
    if category is None:
        raise ValueError(
            "verified_map needs a category (its verifier scores one category's descents); "
            "use greedy_map to leave the category to the model"
        )
    verifier = default_verifier(gm) if verifier is None else verifier
    check_verifier(gm, verifier)
    bu_checked, b = check_bu(gm, bu)
    for c in category_indices(gm, category, b).unique().tolist():
        if not bool(verifier.fitted[c]):
            raise ValueError(f"the verifier has no weights for {gm.categories[c]!r}; it was "
                             f"fitted for {list(verifier.fitted_categories)}")  # fmt: skip
    k = verifier.top_k if top_k is None else top_k
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"top_k must be an int >= 2 (a choice among descents), got {k!r}")
    result = greedy_map(gm, bu, category=category, clamp=clamp, priors=priors,
                        observed=observed, top_k=k)  # fmt: skip
    assert result.modes is not None
    masks_obs = check_observed(gm, observed, bu_checked, b)
    sites = list(result.assignment)
    picked, ordered = [], []
    for i, modes in enumerate(result.modes):
        one = {name: x[i : i + 1] for name, x in bu_checked.items()}
        obs = {name: m.expand(bu_checked[name].shape)[i : i + 1] for name, m in masks_obs.items()}
        values, lj = mode_values(modes, sites, device=gm.device)
        x, _ = descent_features(gm, one, values, lj, read_levels=verifier.read_levels,
                                observed=obs or None)  # fmt: skip
        if not modes:
            raise ValueError(f"image {i}: no feasible top-level hypothesis under the clamps")
        score = verifier.score(x.cpu(), int(values["category"][0]))
        order = sorted(range(len(modes)), key=lambda j: (-float(score[j]), j))
        picked.append(modes[order[0]][0])
        ordered.append([modes[j] for j in order])
    chosen = {s: torch.tensor([a[s] for a in picked], device=gm.device) for s in sites}
    # The chosen descents again, every site clamped: their F̂, masks and log-joints.
    final = greedy_map(gm, bu, priors=priors, observed=observed, clamp=chosen)
    return MapResult(assignment=final.assignment, td=final.td, log_joint=final.log_joint,
                     mask=final.mask, modes=ordered)  # fmt: skip
