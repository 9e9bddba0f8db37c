"""The backward pass with a learned choice among its completed descents (issue #10).

:func:`verified_map` completes greedy's ``top_k`` best top-level hypotheses down to the image
(as ``greedy_map(top_k=k)`` does) and keeps the one a
:class:`~pyro_backpass.model.DescentVerifier` scores highest, from :func:`descent_features`.
Where the model's own score prefers clutter, this choice is made by a function fitted to pick
the descents that cover an object (:func:`~pyro_backpass.learning.fit_descent_verifier`).
A second stage (a verifier with ``levels_below`` > 0) then keeps that descent's top level and
chooses among the completions of every joint (γ, δ) of the levels under it
(:func:`~pyro_backpass.inference.lower_completions`) by the same kind of score.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from pyro_backpass.inference.background import background_log_likelihood
from pyro_backpass.inference.greedy import greedy_map
from pyro_backpass.inference.lower_choice import lower_completions, lower_levels
from pyro_backpass.inference.mask_refine import crf_mask
from pyro_backpass.inference.objective import object_mask, top_down_pass
from pyro_backpass.model.checks import category_indices, check_bu, check_clamp, check_observed
from pyro_backpass.model.descent_verifier import DescentVerifier
from pyro_backpass.model.generative_model import backbone_fingerprint
from pyro_backpass.results import MapResult

if TYPE_CHECKING:
    from pyro_backpass.model.generative_model import GenerativeModel
    from pyro_backpass.model.priors import SitePrior

__all__ = [
    "READ_LEVELS",
    "check_verifier",
    "choice_scores",
    "default_verifier",
    "descent_features",
    "expected_iou",
    "lower_descent_features",
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
    refine: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(k, F)`` of ``k`` completed descents of one image, and their masks
    ``(k, H, W)``.

    :param bu: level → ``(1, C, H, W)``, one image; its ``image`` level is required.
    :param values: every site → ``(k,)`` indices: the k full assignments.
    :param log_joints: ``(k,)`` their log-joints (as :attr:`MapResult.modes` gives them).
    :param read_levels: backbone levels read (those in ``bu``).
    :param refine: each descent's mask is the mask readout's refined by the colour CRF
        (:func:`~pyro_backpass.inference.crf_mask`, its default settings, on the image level
        clipped to [0, 1]) rather than the readout's own; every mask-based column below reads it.

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
    if refine:
        masks = crf_mask(gm, td, rep, bu["image"][0].clamp(0, 1), observed=rep_masks)
    else:
        masks = object_mask(gm, td, rep, rep_masks)  # (k, H, W)
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


def expected_iou(masks: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``(k,)``: each of ``masks`` ``(k, H, W)``'s expected IoU with the k masks weighted by
    ``weights`` ``(k,)`` (a distribution over them): ``Σ_i weights_i · IoU(mask_i, mask_j)``,
    the IoU of two empty masks taken as 1. The highest is the minimum-Bayes-risk choice for
    mask IoU under that distribution."""
    if masks.dim() != 3 or weights.shape != masks.shape[:1]:
        raise ValueError(f"masks must be (k, H, W) and weights (k,), got {tuple(masks.shape)} "
                         f"and {tuple(weights.shape)}")  # fmt: skip
    flat = masks.flatten(1).to(torch.float64)  # (k, H·W)
    inter = flat @ flat.T  # (k, k)
    area = flat.sum(1)
    union = area[:, None] + area[None] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(inter))
    return iou @ weights.to(iou)


def choice_scores(verifier: DescentVerifier, x: torch.Tensor, masks: torch.Tensor,
                  category: int) -> torch.Tensor:  # fmt: skip
    """``(k,)``: what a first-stage verifier's choice among ``k`` descents of one category
    maximises — its score of their features ``x`` ``(k, F)``, or with a ``consensus``
    temperature τ each descent's expected mask IoU (``masks`` ``(k, H, W)``) under
    softmax(score / τ) (:func:`expected_iou`)."""
    score = verifier.score(x, category)
    if verifier.consensus is None:
        return score
    return expected_iou(masks, torch.softmax(score / verifier.consensus, 0))


def verifier_fingerprint(gm: GenerativeModel) -> str:
    """SHA-256 of what a verifier's features depend on: the generative model's parameters and
    its backbone's (which makes 389 of the 400 features)."""
    backbone = "" if gm.backbone is None else backbone_fingerprint(gm.backbone)
    return hashlib.sha256(f"{backbone_fingerprint(gm)}:{backbone}".encode()).hexdigest()


def default_verifier(gm: GenerativeModel, *, lower: bool = False) -> DescentVerifier:
    """The shipped :class:`DescentVerifier` (``lower``: the second stage's) when ``gm`` (and its
    backbone) is the model it was fitted for; otherwise a ValueError that says how to fit one."""
    shipped = DescentVerifier.shipped(lower=lower)
    if shipped is not None and shipped.model_sha256 == verifier_fingerprint(gm):
        return shipped
    if lower and shipped is None:
        raise ValueError(
            "no second-stage descent verifier is shipped (one fitted for the default model "
            "measured no better than the first stage alone; benchmarks/fit_lower_verifier.py): "
            "fit one with pyro_backpass.fit_descent_verifier(gm, scenes, levels_below=2, "
            "first_stage=...) and pass lower="
        )
    what = "second-stage descent verifier" if lower else "descent verifier"
    how = "fit_descent_verifier(gm, scenes, levels_below=2, first_stage=...)" if lower else (
        "fit_descent_verifier(gm, scenes)")  # fmt: skip
    raise ValueError(
        f"no {what} was fitted for this model (the shipped one belongs to "
        f"GenerativeModel.default()): fit one with pyro_backpass.{how} and pass "
        f"{'lower' if lower else 'verifier'}="
    )


def check_verifier(gm: GenerativeModel, verifier: object, *, second_stage: bool = False,
                   categories: torch.Tensor | None = None) -> None:  # fmt: skip
    """A clear error unless ``verifier`` is a :class:`DescentVerifier` for ``gm``: the same
    categories, when it records one, the same model and backbone fingerprint, and the stage
    asked for (a first stage chooses the top level: ``levels_below`` 0; a ``second_stage``
    chooses below it: ``levels_below`` > 0, within the model's depth); with ``categories``
    (category indices), weights for each of them."""
    if not isinstance(verifier, DescentVerifier):
        raise TypeError(f"verifier must be a DescentVerifier, got {type(verifier).__name__}")
    if second_stage and not verifier.levels_below:
        raise ValueError("lower= must be a second-stage verifier (levels_below > 0); this one "
                         "chooses the top level: pass it as verifier=")  # fmt: skip
    if not second_stage and verifier.levels_below:
        raise ValueError(f"this verifier is a second stage (levels_below="
                         f"{verifier.levels_below}): pass it as lower= (verified_map) and a "
                         "first stage as verifier=")  # fmt: skip
    if second_stage:
        lower_levels(gm, verifier.levels_below)  # a clear error beyond the model's depth
    if tuple(verifier.categories) != tuple(gm.categories):
        raise ValueError(f"the verifier's categories {list(verifier.categories)} are not the "
                         f"model's {list(gm.categories)}")  # fmt: skip
    if verifier.model_sha256 is not None and verifier.model_sha256 != verifier_fingerprint(gm):
        raise ValueError(
            "the verifier was fitted for another model or backbone (its fingerprint differs); "
            "fit one for this model with fit_descent_verifier(gm, scenes)"
        )
    for c in [] if categories is None else categories.unique().tolist():
        if not bool(verifier.fitted[c]):
            raise ValueError(f"the verifier has no weights for {gm.categories[c]!r}; it was "
                             f"fitted for {list(verifier.fitted_categories)}")  # fmt: skip


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
    lower: DescentVerifier | bool | None = None,
) -> MapResult:
    """The backward pass whose top-level choice is made by a learned verifier.

    Greedy's ``top_k`` best top-level hypotheses (``verifier.top_k`` if None) of the clamped
    ``category`` are each completed down to the image, exactly as
    ``greedy_map(..., top_k=k)``; the one the ``verifier`` scores highest from its
    :func:`descent_features` is chosen. With a second stage (``lower``), that descent's top
    level is kept and every joint (γ, δ) of the ``lower.levels_below`` levels under it is
    completed (:func:`~pyro_backpass.inference.lower_completions`; 225 on the default model);
    the one ``lower`` scores highest is returned. This is **not** the model's MAP (that is
    :func:`~pyro_backpass.greedy_map`'s): ``log_joint`` is the returned descent's own and
    ``modes`` lists the first stage's k descents in its order, each with its log-joint (with
    a second stage, the returned descent lies below ``modes[i][0]``'s top level). A verifier
    fitted on CRF-refined masks (``verifier.refine_masks``) scores the descents by them; the
    returned ``mask`` is still the readout's: :func:`~pyro_backpass.refine_mask` of the result
    gives the mask it scored. A verifier with a ``consensus`` temperature chooses, and orders
    ``modes``, by each descent's :func:`expected_iou` under the softmax of the scores.

    :param category: required (a name, an index or one per image): the verifier scores the
        descents of one category with that category's weights (linear or an ensemble).
    :param verifier: the first stage; None: the shipped one when ``gm`` is
        ``GenerativeModel.default()``.
    :param lower: the second stage: a :class:`DescentVerifier` with ``levels_below`` > 0;
        True: the shipped one (an error if it has no weights for the category); False: none;
        None: the shipped second stage, if there is one for ``gm`` fitted behind this
        ``verifier`` (its recorded ``first_stage_sha256``), for the images whose category it
        has weights for; otherwise none. An explicit second stage that records another first
        stage is an error.
    :param clamp, priors, observed: as in :func:`~pyro_backpass.greedy_map`.

    Example::

        gm = GenerativeModel.default()
        scene = make_scene(seed=3)
        bu = gm.backbone(scene.image[None])
        result = verified_map(gm, bu, category="airplane")
        result.mask  # (1, 64, 64): the verified descent's mask
        # the best first pass measured: refined masks, chosen by consensus (airplanes)
        best = verified_map(gm, bu, category="airplane",
                            verifier=DescentVerifier.shipped(refined=True))
        mask = refine_mask(gm, best, bu, scene.image)  # (1, 64, 64)
    """
    if category is None:
        raise ValueError(
            "verified_map needs a category (its verifier scores one category's descents); "
            "use greedy_map to leave the category to the model"
        )
    verifier = default_verifier(gm) if verifier is None else verifier
    bu_checked, b = check_bu(gm, bu)
    cats = category_indices(gm, category, b)
    check_verifier(gm, verifier, categories=cats)
    second = _second_stage(gm, lower, cats, verifier)
    k = verifier.top_k if top_k is None else top_k
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"top_k must be an int >= 2 (a choice among descents), got {k!r}")
    result = greedy_map(gm, bu, category=category, clamp=clamp, priors=priors,
                        observed=observed, top_k=k)  # fmt: skip
    assert result.modes is not None
    masks_obs = check_observed(gm, observed, bu_checked, b)
    clamps = check_clamp(gm, clamp, b)  # site → (B,): image i's are [i]
    sites = list(result.assignment)
    picked, ordered = [], []
    for i, modes in enumerate(result.modes):
        one = {name: x[i : i + 1] for name, x in bu_checked.items()}
        obs = {name: m.expand(bu_checked[name].shape)[i : i + 1] for name, m in masks_obs.items()}
        values, lj = mode_values(modes, sites, device=gm.device)
        x, masks = descent_features(gm, one, values, lj, read_levels=verifier.read_levels,
                                    observed=obs or None, refine=verifier.refine_masks)  # fmt: skip
        if not modes:
            raise ValueError(f"image {i}: no feasible top-level hypothesis under the clamps")
        c = int(values["category"][0])
        score = choice_scores(verifier, x.cpu(), masks.cpu(), c)
        order = sorted(range(len(modes)), key=lambda j: (-float(score[j]), j))
        best = dict(modes[order[0]][0])
        if second is not None and bool(second.fitted[c]):
            mine = {s: int(v[i]) for s, v in clamps.items() if s != "category"}
            best = _lower_choice(gm, second, one, best, c, clamp=mine, priors=priors,
                                 observed=obs or None)  # fmt: skip
        picked.append(best)
        ordered.append([modes[j] for j in order])
    chosen = {s: torch.tensor([a[s] for a in picked], device=gm.device) for s in sites}
    # The chosen descents again, every site clamped: their F̂, masks and log-joints.
    final = greedy_map(gm, bu, priors=priors, observed=observed, clamp=chosen)
    return MapResult(assignment=final.assignment, td=final.td, log_joint=final.log_joint,
                     mask=final.mask, modes=ordered)  # fmt: skip


def _second_stage(gm: GenerativeModel, lower: Any, cats: torch.Tensor,
                  first: DescentVerifier) -> DescentVerifier | None:  # fmt: skip
    """``verified_map``'s ``lower=`` resolved to a second-stage verifier or None."""
    if lower is False:
        return None
    if lower is None:
        shipped = DescentVerifier.shipped(lower=True)
        if (shipped is None or shipped.model_sha256 != verifier_fingerprint(gm)
                or not shipped.levels_below
                or shipped.first_stage_sha256 != first.fingerprint()):  # fmt: skip
            return None
        return shipped
    second = default_verifier(gm, lower=True) if lower is True else lower
    check_verifier(gm, second, second_stage=True)
    if second.first_stage_sha256 not in (None, first.fingerprint()):
        raise ValueError("the second-stage verifier was fitted behind another first stage (its "
                         "first_stage_sha256 differs from verifier's fingerprint)")  # fmt: skip
    for c in cats.unique().tolist():
        if not bool(second.fitted[c]):
            raise ValueError(f"the second-stage verifier has no weights for "
                             f"{gm.categories[c]!r}; it was fitted for "
                             f"{list(second.fitted_categories)} (lower=None uses it only "
                             "where it has)")  # fmt: skip
    return second


@torch.no_grad()
def lower_descent_features(
    gm: GenerativeModel,
    bu: Mapping[str, torch.Tensor],
    chosen: Mapping[str, Any],
    *,
    levels_below: int,
    read_levels: Sequence[str] = READ_LEVELS,
    clamp: Mapping[str, int] | None = None,
    priors: Mapping[str, SitePrior] | None = None,
    observed: Mapping[str, torch.Tensor] | None = None,
    refine: bool = False,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """What a second stage chooses among, on one image: ``chosen``'s (a full assignment's)
    category and top level kept, the :func:`~pyro_backpass.inference.lower_completions` of the
    ``levels_below`` levels under it that have a finite log-joint (a prior may forbid some;
    ``chosen``'s own completion is among them), and their :func:`descent_features`.

    :param bu: level → ``(1, C, H, W)``, one image (with its ``image`` level).
    :param clamp: further sites → int the completions must take (not the top level's).
    :param refine: the masks are the colour CRF's (as in :func:`descent_features`).
    :returns: every site → ``(m,)`` indices, features ``(m, F)`` and masks ``(m, H, W)``.
    """
    name = gm.hidden_levels[-1]
    top = {s: int(chosen[s]) for s in (f"gamma_{name}", f"delta_{name}")}
    result = lower_completions(gm, bu, category=int(chosen["category"]), top=top,
                               levels_below=levels_below, clamp=clamp, priors=priors,
                               observed=observed)  # fmt: skip
    ok = torch.isfinite(result.log_joint).nonzero()[:, 0]
    if len(ok) == 0:
        raise ValueError("no completion below the kept top level is feasible under the clamps "
                         "and priors")  # fmt: skip
    values = {s: v[ok] for s, v in result.assignment.items()}
    x, masks = descent_features(gm, bu, values, result.log_joint[ok], read_levels=read_levels,
                                observed=observed, refine=refine)  # fmt: skip
    return values, x, masks


def _lower_choice(gm: GenerativeModel, second: DescentVerifier, bu: Mapping[str, torch.Tensor],
                  chosen: Mapping[str, int], c: int, *, clamp: Mapping[str, int], priors,
                  observed) -> dict[str, int]:  # fmt: skip
    """The second stage on one image: of :func:`lower_descent_features` below ``chosen``'s
    top level, the full assignment ``second`` scores highest (ties: the first enumerated)."""
    name = gm.hidden_levels[-1]
    rest = {s: v for s, v in clamp.items() if s not in (f"gamma_{name}", f"delta_{name}")}
    values, x, _ = lower_descent_features(gm, bu, chosen, levels_below=second.levels_below,
                                          read_levels=second.read_levels, clamp=rest,
                                          priors=priors, observed=observed,
                                          refine=second.refine_masks)  # fmt: skip
    j = int(second.score(x.cpu(), c).argmax())  # argmax: the first of equal maxima
    return {s: int(v[j]) for s, v in values.items()}
