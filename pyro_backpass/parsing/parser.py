"""Scene parsing by repeated backward passes (paper §3.2): each step finds the best object
hypothesis, explains it away on every level, and the parse stops when the best remaining
hypothesis no longer beats an all-background explanation by a threshold fitted on validation
scenes.

One step, on every view of the scan (scales and windows, see :mod:`.views`) at once:

1. the backward pass (:func:`~pyro_backpass.greedy_map` with ``top_k``) on the view's current
   bottom-up maps gives the step's posterior modes, each completed greedily to the image;
2. each mode is scored by its log-likelihood ratio against background,
   ``LLR = log_joint − background_log_likelihood`` on the same elements — comparable across
   views and scales, unlike a raw log-joint;
3. the best mode (or, with a query's preference, the preferred one among those above the
   threshold) becomes an instance; it is explained away in its own view on every hidden level
   (:func:`.explaining_away.explain_away`) and its pixels are marked unobserved in the other views.

With ``beam = B`` the B best parse paths are kept, each scored by ``Σ (LLR_i − threshold)``
over its instances; a path ends when stopping beats every extension (at B = 1 this is the
greedy parse). Scale is not a hidden variable of the model: the scan compares views.

Reference: Wang et al. 2016, §3.2 (scene parsing, multiple parsing paths) and §3.3 (scales).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from pyro_backpass.backbone.activations import downsample_mask
from pyro_backpass.inference.background import background_log_likelihood
from pyro_backpass.inference.greedy import greedy_map
from pyro_backpass.inference.objective import object_mask, top_down_pass
from pyro_backpass.parsing.explaining_away import explain_away
from pyro_backpass.parsing.query import Query, location_prior
from pyro_backpass.parsing.scene_parse import ParsedInstance, SceneParse
from pyro_backpass.parsing.threshold import default_threshold
from pyro_backpass.parsing.views import View, as_image, make_views

if TYPE_CHECKING:
    from pyro_backpass.backbone import Backbone
    from pyro_backpass.model.generative_model import GenerativeModel

__all__ = ["BACKGROUNDS", "MAX_STEPS", "parse_activations", "parse_scene", "run_parse"]

#: A hard limit on steps when ``max_objects`` is None, so any input parses in bounded time.
MAX_STEPS = 12
#: The all-background explanations the stop criterion can compare with.
BACKGROUNDS = ("profile", "off")
#: Hypotheses of the top level listed per step (the modes).
DEFAULT_TOP_K = 10


@dataclass
class _Path:
    """One parse path: per-view bottom-up maps and observed masks, the instances so far."""

    bu: dict[str, torch.Tensor]  # level -> (V, C, H, W)
    observed: dict[str, torch.Tensor]  # level -> (V, C, H, W) bool
    claimed: torch.Tensor  # (H, W) bool: visible pixels of the instances so far
    instances: list[ParsedInstance] = field(default_factory=list)
    score: float = 0.0
    done: str | None = None
    stop_score: float | None = None


@dataclass
class _Candidate:
    path: int
    view: int
    row: int  # row of the stacked batch it came from
    llr: float
    log_joint: float
    assignment: dict[str, int]
    modes: list
    bu: dict[str, torch.Tensor] | None = None  # level -> (1, C, H, W): its view's maps
    obs: dict[str, torch.Tensor] | None = None  # level -> (1, C, H, W) bool
    td: dict[str, torch.Tensor] | None = None  # level -> (1, C, H, W), view space
    amodal: torch.Tensor | None = None  # (H, W) image space
    mode_masks: list[torch.Tensor] | None = None  # amodal masks of its row's modes


def parse_scene(
    gm: GenerativeModel,
    image: Any,
    *,
    max_objects: int | None = None,
    query: Query | None = None,
    beam: int = 1,
    scales: Sequence[float] = (1.0,),
    backbone: Backbone | None = None,
) -> SceneParse:
    """Parse a scene into object instances, one backward pass per instance.

    :param gm: the generative model (``GenerativeModel.default()`` for the shipped one).
    :param image: ``(3, H, W)`` float in [0, 1], or a PIL image / numpy array / tensor of any
        size and mode (grey and RGBA are converted; see :func:`.views.as_image`).
    :param max_objects: a cap on the instances (the stop criterion decides otherwise; without
        a cap the parser stops after :data:`MAX_STEPS` at most).
    :param query: a :class:`~pyro_backpass.parsing.Query` (category, category prior, location
        preference, preference over modes, occluder, imagination), or None.
    :param beam: parse paths kept (1: greedy).
    :param scales: the scan's scales; 1.0 fits the whole image to the model's input, 2.0
        resizes it to twice that and slides windows. Scale is not a hidden variable.
    :param backbone: the CNN whose activations are modelled (default ``gm.backbone``).
    :returns: :class:`~pyro_backpass.parsing.SceneParse`; the threshold is the shipped fit for
        the shipped model (``pyro_backpass/weights/parse_threshold.json``), else 0; use
        :func:`run_parse` to set it.

    Example::

        gm = GenerativeModel.default()
        scene = make_scene(seed=split_seed("test", 0))
        parse = parse_scene(gm, scene.image, max_objects=4)
        [(i.category, i.score) for i in parse.instances], parse.stop_reason
    """
    return run_parse(
        gm, image, max_objects=max_objects, query=query, beam=beam, scales=scales,
        backbone=backbone,
    )  # fmt: skip


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


def _level_masks(gm: GenerativeModel, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Image-space bool masks ``(B, S, S)`` → per hidden level ``(B, 1, h, w)``: the cells the
    mask dominates (its pooled cover ≥ 0.5)."""
    out = {}
    for spec in gm.levels[:-1]:
        if (spec.height, spec.width) == tuple(mask.shape[-2:]):
            out[spec.name] = mask[:, None]
        else:
            out[spec.name] = (downsample_mask(mask, (spec.height, spec.width)) >= 0.5)[:, None]
    return out


def _preference_key(prefer: str, amodal: torch.Tensor, image: torch.Tensor) -> float:
    """Larger is preferred."""
    area = float(amodal.sum())
    if area == 0:
        return -math.inf
    ys, xs = torch.nonzero(amodal, as_tuple=True)
    brightness = float(image[:, amodal].mean())
    return {
        "largest": area,
        "smallest": -area,
        "leftmost": -float(xs.float().mean()),
        "rightmost": float(xs.float().mean()),
        "topmost": -float(ys.float().mean()),
        "darkest": -brightness,
        "brightest": brightness,
    }[prefer]


def run_parse(
    gm: GenerativeModel,
    image: Any,
    *,
    max_objects: int | None = None,
    query: Query | None = None,
    beam: int = 1,
    scales: Sequence[float] = (1.0,),
    backbone: Backbone | None = None,
    threshold: float | None = None,
    explain: str | None = None,
    background: str | None = None,
    top_k: int = DEFAULT_TOP_K,
    mode_masks: bool = False,
) -> SceneParse:
    """:func:`parse_scene` with the criterion's knobs: ``threshold`` (log-likelihood ratio;
    None: the shipped fit), ``explain`` (``"subtract"`` or ``"unobserve"``, see
    :func:`.explaining_away.explain_away`; None: the shipped choice), ``background``
    (``"profile"`` or ``"off"``, see :func:`~pyro_backpass.inference.background_log_likelihood`;
    None: the shipped choice), ``top_k`` (modes per step) and ``mode_masks`` (also complete
    every mode of each step down to the image, for :attr:`ParsedInstance.mode_masks`; costs a
    top-down pass per mode). ``threshold=-math.inf`` never stops before ``max_objects``."""
    backbone = gm.backbone if backbone is None else backbone
    if backbone is None:
        raise ValueError("gm has no backbone attached; pass backbone=")
    size = gm.levels[0].height
    if (gm.levels[0].height, gm.levels[0].width) != tuple(backbone.image_size):
        raise ValueError(f"model input {size} px != backbone input {backbone.image_size}")
    img = as_image(image, dtype=gm.dtype)  # (3, H, W) on CPU
    views = make_views(img, size=size, scales=tuple(scales))
    with torch.no_grad():
        acts = backbone(torch.stack([v.image for v in views]).to(gm.device))
    bu0 = {k: v.detach() for k, v in acts.items() if k in gm.hidden_levels}  # (V, C, h, w)
    return _parse(gm, img, views, bu0, max_objects=max_objects, query=query, beam=beam,
                  threshold=threshold, explain=explain, background=background,
                  top_k=top_k, mode_masks=mode_masks)  # fmt: skip


def parse_activations(
    gm: GenerativeModel,
    bu: Mapping[str, torch.Tensor],
    *,
    image: torch.Tensor | None = None,
    max_objects: int | None = None,
    query: Query | None = None,
    beam: int = 1,
    threshold: float | None = None,
    explain: str | None = None,
    background: str | None = None,
    top_k: int = DEFAULT_TOP_K,
    mode_masks: bool = False,
) -> SceneParse:
    """:func:`run_parse` on given bottom-up activations of one model-sized input (level →
    ``(1, C, H, W)``, e.g. built from the model's own top-down activations in tests), no scan.
    ``image``: ``(3, S, S)`` for the preferences that read colours (default ``bu["image"]``
    clipped to [0, 1])."""
    bu0 = {k: v.detach() for k, v in bu.items() if k in gm.hidden_levels}
    if not bu0 or any(v.dim() != 4 or v.shape[0] != 1 for v in bu0.values()):
        raise ValueError("bu must map the model's levels to (1, C, H, W) activations")
    size = gm.levels[0].height
    if image is None:
        image = bu0["image"][0].clamp(0, 1) if "image" in bu0 else torch.zeros(3, size, size)
    img = image.detach().cpu().to(gm.dtype)
    view = View(img, 1.0, 1.0, (0, 0), (size, size))
    return _parse(gm, img, [view], bu0, max_objects=max_objects, query=query, beam=beam,
                  threshold=threshold, explain=explain, background=background,
                  top_k=top_k, mode_masks=mode_masks)  # fmt: skip


def _parse(
    gm: GenerativeModel,
    img: torch.Tensor,
    views: list[View],
    bu0: dict[str, torch.Tensor],
    *,
    max_objects: int | None,
    query: Query | None,
    beam: int,
    threshold: float | None,
    explain: str | None,
    background: str | None,
    top_k: int,
    mode_masks: bool = False,
) -> SceneParse:
    """The parse loop on the views' bottom-up maps ``bu0`` (level → ``(V, C, h, w)``)."""
    if max_objects is not None:
        _check_int("max_objects", max_objects, 0)
    _check_int("beam", beam, 1)
    _check_int("top_k", top_k, 1)
    query = Query() if query is None else query
    if not isinstance(query, Query):
        raise TypeError(f"query must be a pyro_backpass.parsing.Query, got {type(query).__name__}")
    fitted = default_threshold(gm)
    threshold = fitted["threshold"] if threshold is None else float(threshold)
    how = fitted["explain_away"] if explain is None else explain
    background = fitted["background"] if background is None else background
    if background not in BACKGROUNDS:
        raise ValueError(f"background={background!r}; choose one of {BACKGROUNDS}")
    height, width = img.shape[-2:]
    device = gm.device
    occluder = None
    if query.occluder is not None:
        occluder = torch.as_tensor(query.occluder, dtype=torch.bool).cpu()
        if tuple(occluder.shape) != (height, width):
            raise ValueError(
                f"occluder mask is {tuple(occluder.shape)}; the image is {(height, width)}"
            )
    observed0 = {n: torch.ones_like(x, dtype=torch.bool) for n, x in bu0.items()}
    if occluder is not None:
        view_occ = torch.stack([v.from_image(occluder) for v in views]).to(device)
        for name, m in _level_masks(gm, view_occ).items():
            if name in observed0:
                observed0[name] = observed0[name] & ~m
    thresholds = {n: float(gm.observations[n].threshold) for n in gm.hidden_levels}

    cap = MAX_STEPS if max_objects is None else max_objects
    if query.imagine:
        cap = min(cap, 1)
    paths = [_Path(bu0, observed0, torch.zeros(height, width, dtype=torch.bool))]
    step = 0
    while True:
        active = [p for p in paths if p.done is None]
        if not active:
            break
        if step >= cap:
            if query.imagine:
                reason = "imagined"
            elif max_objects is not None and step >= max_objects:
                reason = "max_objects"
            else:
                reason = "step_limit"
            for p in active:
                p.done = reason
            break
        cands = _step_candidates(gm, active, views, query, top_k=top_k,
                                 profile=background == "profile", height=height,
                                 width=width)  # fmt: skip
        new_paths: list[tuple[float, _Path, _Candidate | None]] = [
            (p.score, p, None) for p in paths if p.done is not None
        ]
        for pi, p in enumerate(active):
            mine = sorted((c for c in cands if c.path == pi), key=lambda c: -c.llr)
            if not mine:
                new_paths.append((p.score, p, None))
                p.done, p.stop_score = "no_hypothesis", None
                continue
            force = query.imagine and step == 0
            eligible = [c for c in mine if c.llr > threshold] or (mine[:1] if force else [])
            if not eligible:
                p.done, p.stop_score = "below_threshold", mine[0].llr
                new_paths.append((p.score, p, None))
                continue
            chosen = _choose(gm, p, eligible, views, query, beam=beam, height=height,
                             width=width, image=img)  # fmt: skip
            for c in chosen:
                if mode_masks:  # the step's modes in the instance's view (Fig. 5's marks)
                    row = [d for d in cands if d.row == c.row]
                    _complete_all(gm, row, views, height, width)
                    c.mode_masks = [d.amodal for d in row]
                new_paths.append((p.score + (c.llr - threshold), p, c))
            if not force:  # stopping here is a path of its own (beam > 1)
                new_paths.append((p.score, _stopped(p, mine[0].llr), None))
        new_paths.sort(key=lambda t: -t[0])
        kept: list[_Path] = []
        for score, p, c in new_paths[:beam]:
            if c is None:
                kept.append(p)
            else:
                kept.append(_extend(gm, p, c, views, query, score=score, how=how,
                                    thresholds=thresholds, occluder=occluder, height=height,
                                    width=width))  # fmt: skip
        paths = kept
        step += 1
    best = max(paths, key=lambda p: p.score)
    return SceneParse(
        instances=list(best.instances),
        stop_reason=best.done or "step_limit",
        image=img,
        threshold=threshold,
        stop_score=best.stop_score,
        beam=beam,
    )


def _stopped(p: _Path, stop_score: float) -> _Path:
    return _Path(p.bu, p.observed, p.claimed, list(p.instances), p.score, "below_threshold",
                 stop_score)  # fmt: skip


def _step_candidates(
    gm: GenerativeModel,
    active: list[_Path],
    views: list[View],
    query: Query,
    *,
    top_k: int,
    profile: bool,
    height: int,
    width: int,
) -> list[_Candidate]:
    """Every active path's top-k modes in every view, with their log-likelihood ratios."""
    nv = len(views)
    bu = {n: torch.cat([p.bu[n] for p in active]) for n in active[0].bu}  # (P*V, C, h, w)
    obs = {n: torch.cat([p.observed[n] for p in active]) for n in active[0].observed}
    base_priors = {}
    cat_prior = query.category_prior(gm)
    if cat_prior is not None:
        base_priors["category"] = cat_prior
    top = gm.hidden_levels[-1]
    place = query.place
    # A location prior depends on the view (where the place falls in it): one call per view.
    groups = [list(range(len(active) * nv))] if place is None or nv == 1 else [
        [pi * nv + v for pi in range(len(active))] for v in range(nv)]  # fmt: skip
    k = min(top_k, gm.site_sizes["category"] * gm.site_sizes[f"gamma_{top}"]
            * gm.site_sizes[f"delta_{top}"])  # fmt: skip
    k = max(k, 2)  # top_k > 1 so that modes are listed
    out = []
    for rows in groups:
        priors = dict(base_priors)
        if place is not None:
            box = views[rows[0] % nv].box(height, width)
            priors[f"delta_{top}"] = location_prior(
                gm, place, weight=query.location_weight, view_box=box
            )
        idx = torch.tensor(rows, device=gm.device)
        sub_bu = {n: x[idx] for n, x in bu.items()}
        sub_obs = {n: m[idx] for n, m in obs.items()}
        result = greedy_map(gm, sub_bu, category=query.category, priors=priors or None,
                            observed=sub_obs, top_k=k)  # fmt: skip
        bg = background_log_likelihood(gm, sub_bu, observed=sub_obs, profile=profile)  # (R,)
        for j, row in enumerate(rows):
            modes = result.modes[j]
            for assignment, lj in modes:
                if not math.isfinite(lj):
                    continue
                out.append(_Candidate(path=row // nv, view=row % nv, row=row,
                                      llr=lj - float(bg[j]), log_joint=lj,
                                      assignment=assignment, modes=modes))  # fmt: skip
    for c in out:
        c.bu = {n: x[c.row : c.row + 1] for n, x in bu.items()}
        c.obs = {n: m[c.row : c.row + 1] for n, m in obs.items()}
    return out


def _complete(gm: GenerativeModel, c: _Candidate, views: list[View], height: int, width: int):
    """F̂_td of a candidate (its full assignment) and its amodal mask in image space."""
    _complete_all(gm, [c], views, height, width)
    return c


def _complete_all(
    gm: GenerativeModel, cands: list[_Candidate], views: list[View], height: int, width: int
) -> None:
    """:func:`_complete` of many candidates, one batched top-down pass per view row."""
    by_row: dict[int, list[_Candidate]] = {}
    for c in cands:
        if c.td is None:
            by_row.setdefault(c.row, []).append(c)
    for group in by_row.values():
        n = len(group)
        values = {s: torch.tensor([c.assignment[s] for c in group], device=gm.device)
                  for s in group[0].assignment}  # fmt: skip
        bu = {k: x.expand(n, *x.shape[1:]) for k, x in group[0].bu.items()}  # (n, C, H, W)
        obs = {k: m.expand(n, *m.shape[1:]) for k, m in group[0].obs.items()}
        with torch.no_grad():
            td, _ = top_down_pass(gm, values, bu, obs)
        masks = object_mask(gm, td).cpu()  # (n, S, S)
        for j, c in enumerate(group):
            c.td = {k: v[j : j + 1] for k, v in td.items()}
            c.amodal = views[c.view].to_image(masks[j], height, width)


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def _choose(
    gm, p: _Path, eligible: list[_Candidate], views, query: Query, *, beam: int, height: int,
    width: int, image: torch.Tensor,
) -> list[_Candidate]:  # fmt: skip
    """The candidates a path is extended with: the preferred one (a query's preference), else
    the ``beam`` best by LLR that are not the same object (amodal IoU < 0.5 with a better one)."""
    if query.prefer is not None:
        _complete_all(gm, eligible, views, height, width)
        return [max(eligible, key=lambda c: (_preference_key(query.prefer, c.amodal, image),
                                             c.llr))]  # fmt: skip
    if beam == 1:
        return [_complete(gm, eligible[0], views, height, width)]
    chosen: list[_Candidate] = []
    _complete_all(gm, eligible[: 4 * beam], views, height, width)
    for c in eligible[: 4 * beam]:
        if all(_iou(c.amodal, d.amodal) < 0.5 for d in chosen):
            chosen.append(c)
        if len(chosen) == beam:
            break
    return chosen


def _extend(
    gm, p: _Path, c: _Candidate, views: list[View], query: Query, *, score: float, how: str,
    thresholds, occluder, height: int, width: int,
) -> _Path:  # fmt: skip
    """A new path: ``p`` with candidate ``c`` as its next instance, explained away."""
    v = c.view
    bu = {n: x.clone() for n, x in p.bu.items()}
    observed = {n: m.clone() for n, m in p.observed.items()}
    one_bu = {n: x[v : v + 1] for n, x in p.bu.items()}
    one_obs = {n: m[v : v + 1] for n, m in p.observed.items()}
    new_bu, new_obs = explain_away(one_bu, one_obs, c.td, thresholds, how=how)
    for n in bu:
        bu[n][v : v + 1] = new_bu[n]
        observed[n][v : v + 1] = new_obs[n]
    if len(views) > 1:  # the object's pixels, seen from every other view: unobserved there
        others = [u for u in range(len(views)) if u != v]
        masks = torch.stack([views[u].from_image(c.amodal) for u in others]).to(gm.device)
        for name, m in _level_masks(gm, masks).items():
            if name in observed:
                observed[name][others] = observed[name][others] & ~m
    amodal = c.amodal
    visible = amodal & ~p.claimed
    if occluder is not None:
        visible = visible & ~occluder
    view = views[v]
    instance = ParsedInstance(
        category=gm.categories[c.assignment["category"]],
        mask=visible,
        amodal_mask=amodal,
        score=c.llr,
        reconstruction=view.to_image(c.td["image"][0].detach().cpu(), height, width),
        modes=c.modes,
        mode_scores=[d_lj - (c.log_joint - c.llr) for _, d_lj in c.modes],
        mode_masks=torch.stack(c.mode_masks) if c.mode_masks else None,
        log_joint=c.log_joint,
        assignment=dict(c.assignment),
        scale=view.scale,
        view=v,
    )
    return _Path(bu, observed, p.claimed | visible, [*p.instances, instance], score)
