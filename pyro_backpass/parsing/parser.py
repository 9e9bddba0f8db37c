"""Scene parsing by repeated backward passes (paper §3.2): each step finds the best object
hypothesis, explains it away on every level, and the parse stops when the best remaining
hypothesis's stop statistic (:class:`~pyro_backpass.parsing.StopCriterion`) is no longer above
a threshold fitted on validation scenes.

One step, on every view of the scan (scales and windows, see :mod:`.views`) at once:

1. the backward pass (:func:`~pyro_backpass.greedy_map` with ``top_k``) on the view's current
   bottom-up maps gives the step's posterior modes, each completed greedily to the image;
2. each mode is scored by its log-likelihood ratio against background,
   ``LLR = log_joint − background_log_likelihood`` on the same elements — comparable across
   views and scales, unlike a raw log-joint;
3. the best mode by LLR is completed and its stop statistic computed: the LLR itself
   (the paper's criterion, the fallback), or for the shipped model a log-odds of "new object"
   fitted on validation parses from its LLR, its visible and amodal pixels and the step
   (:mod:`.stop`: the LLR alone is inverted on the shipped model). At or below the threshold
   the path stops; else the mode (or, with a query's preference, the preferred one among the
   completed modes above the threshold) becomes an instance; it is explained away in its own
   view on every hidden level (:func:`.explaining_away.explain_away`) and its pixels are
   marked unobserved in the other views.

With ``beam = B`` the B best parse paths are kept, each scored by ``Σ (statistic_i − threshold)``
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
from pyro_backpass.inference.mask_refine import crf_mask
from pyro_backpass.inference.verification import check_verifier
from pyro_backpass.parsing.candidates import (
    Candidate,
    StepRow,
    complete_candidates,
    step_candidates,
    verify_candidates,
)
from pyro_backpass.parsing.explaining_away import explain_away
from pyro_backpass.parsing.head_choice import HEAD_IOU, HEAD_POOL, HeadChoice
from pyro_backpass.parsing.query import Query
from pyro_backpass.parsing.scene_parse import ParsedInstance, SceneParse
from pyro_backpass.parsing.stop import StopCriterion, region_log_prob
from pyro_backpass.parsing.threshold import default_threshold, model_fingerprint
from pyro_backpass.parsing.views import View, as_image, make_views

if TYPE_CHECKING:
    from pyro_backpass.backbone import Backbone
    from pyro_backpass.model.descent_verifier import DescentVerifier
    from pyro_backpass.model.generative_model import GenerativeModel

__all__ = [
    "BACKGROUNDS",
    "MAX_STEPS",
    "parse_activations",
    "parse_scene",
    "parse_scenes",
    "run_parse",
]

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
    criterion: StopCriterion | None = None,
    explain: str | None = None,
    background: str | None = None,
    top_k: int = DEFAULT_TOP_K,
    mode_masks: bool = False,
    verifier: DescentVerifier | Mapping[str, DescentVerifier] | None = None,
    refine_masks: bool = False,
    choose: HeadChoice | None = None,
) -> SceneParse:
    """:func:`parse_scene` with the criterion's knobs:

    - ``criterion``: the stop statistic, a :class:`~pyro_backpass.parsing.StopCriterion`
      (None: the shipped fit);
    - ``threshold``: on that statistic (None: the shipped fit); ``-math.inf`` never stops
      before ``max_objects``;
    - ``explain``: ``"subtract"`` or ``"unobserve"``, see
      :func:`.explaining_away.explain_away` (None: the shipped choice);
    - ``background``: ``"profile"`` or ``"off"``, see
      :func:`~pyro_backpass.inference.background_log_likelihood` (None: the shipped choice);
    - ``top_k``: modes per step; ``mode_masks``: also complete every mode of each step down
      to the image, for :attr:`ParsedInstance.mode_masks` (a top-down pass per mode);
    - ``verifier``: a :class:`~pyro_backpass.DescentVerifier` (issue #10): each step's
      ``top_k`` modes are scored by it; per view and category its best is completed, and of
      these the one with the largest stop statistic is the step's hypothesis (the verifier's
      scores compare one category's descents of one view only). It must be fitted for every
      category a step can choose (the query's, or all). With the shipped verifier and the
      ``top_k`` it was fitted with (100), the default criterion and threshold are those fitted
      on verified parses (``parse_threshold_verified.json``, see
      :func:`.threshold.default_threshold`); otherwise the plain parse's. None: rank by the
      log-likelihood ratio. A mapping category name → verifier gives each category its own
      (e.g. ``{**{c: DescentVerifier.shipped() for c in gm.categories}, "airplane":
      DescentVerifier.shipped(refined=True)}``); a verifier with ``refine_masks`` scores its
      category's modes by their CRF-refined masks, one with a ``consensus`` temperature by
      their expected mask IoU under its vote, as :func:`~pyro_backpass.verified_map` does. A
      mapping of more than one verifier stops by the plain parse's criterion.
    - ``refine_masks``: each found instance's masks are the mask readout's refined by the
      colour-bilateral CRF of :func:`~pyro_backpass.refine_mask` in its view (issue #10's
      option; the step's choice, its stop statistic and the explaining away are unchanged,
      the refined mask is what the instance reports and what later steps' visible masks
      exclude). Needs a model with a mask readout.
    - ``choose``: a :class:`~pyro_backpass.parsing.HeadChoice`: each step completes the best
      mode of each category in each view (by the verifier's score, or by LLR without one) and
      takes the head of largest choice score, not of largest stop statistic (which ranks a
      step's heads at chance, ``benchmarks/parse_first_step.py``); the stop is decided on
      that head's statistic as before; its ``per_category`` m > 1 offers each category's m
      best modes whose masks differ, and its ``refined_heads`` reads every head on its
      CRF-refined masks (needs ``refine_masks=True``). ``HeadChoice.shipped()`` is fitted for
      the shipped model and verifier at ``top_k=100`` (``benchmarks/fit_head_choice.py``).
      Needs a backbone with a classifier head (its features read the classifier).
    """
    return parse_scenes(
        gm, [image], max_objects=max_objects, query=query, beam=beam, scales=scales,
        backbone=backbone, threshold=threshold, criterion=criterion, explain=explain,
        background=background, top_k=top_k, mode_masks=mode_masks, verifier=verifier,
        refine_masks=refine_masks, choose=choose,
    )[0]  # fmt: skip


def parse_scenes(
    gm: GenerativeModel,
    images: Sequence[Any],
    *,
    max_objects: int | None = None,
    query: Query | None = None,
    beam: int = 1,
    scales: Sequence[float] = (1.0,),
    backbone: Backbone | None = None,
    threshold: float | None = None,
    criterion: StopCriterion | None = None,
    explain: str | None = None,
    background: str | None = None,
    top_k: int = DEFAULT_TOP_K,
    mode_masks: bool = False,
    verifier: DescentVerifier | Mapping[str, DescentVerifier] | None = None,
    refine_masks: bool = False,
    choose: HeadChoice | None = None,
) -> list[SceneParse]:
    """:func:`run_parse` of many images at once: one :class:`SceneParse` per image, each what
    :func:`parse_scene` gives for that image alone (up to floating-point rounding of batched
    kernels), with the work batched across images.

    The backbone runs once on every view of every image; each step's backward pass
    (:func:`~pyro_backpass.greedy_map` with ``top_k``) runs once for every view of every active
    parse path of every image still parsing, as rows of one batch, and the chosen hypotheses
    are completed to the image in one batched top-down pass; an image leaves the batch when
    its parse stops. Images may differ in size and mode (see :func:`.views.as_image`); the
    options apply to all of them (an occluder's mask must fit every image). An image that
    cannot be read raises ``ValueError`` / ``TypeError`` naming its index.

    Example::

        gm = GenerativeModel.default()
        scenes = [make_scene(seed=split_seed("test", i)).image for i in range(8)]
        parses = parse_scenes(gm, scenes, max_objects=4)
        [(len(p.instances), p.stop_reason) for p in parses]
    """
    backbone = gm.backbone if backbone is None else backbone
    if backbone is None:
        raise ValueError("gm has no backbone attached; pass backbone=")
    size = gm.levels[0].height
    if (gm.levels[0].height, gm.levels[0].width) != tuple(backbone.image_size):
        raise ValueError(f"model input {size} px != backbone input {backbone.image_size}")
    if isinstance(images, torch.Tensor) and images.dim() == 3:
        raise TypeError("images must be a sequence of images; for one image use parse_scene")
    imgs, all_views = [], []
    for i, image in enumerate(images):
        try:
            img = as_image(image, dtype=gm.dtype)  # (3, H, W) on CPU
        except (TypeError, ValueError) as err:
            raise type(err)(f"images[{i}]: {err}") from err
        imgs.append(img)
        all_views.append(make_views(img, size=size, scales=tuple(scales)))
    if not imgs:
        return []
    with torch.no_grad():  # one backbone call for every view of every image
        acts = backbone(torch.stack([v.image for vs in all_views for v in vs]).to(gm.device))
    bu_all = {k: v.detach() for k, v in acts.items() if k in gm.hidden_levels}  # (ΣV, C, h, w)
    firsts = [0]
    for vs in all_views:
        firsts.append(firsts[-1] + len(vs))
    scenes = [
        (img, views, {k: v[a:b] for k, v in bu_all.items()})  # level -> (V, C, h, w)
        for img, views, a, b in zip(imgs, all_views, firsts[:-1], firsts[1:], strict=True)
    ]
    return _parse(gm, scenes, max_objects=max_objects, query=query, beam=beam,
                  threshold=threshold, criterion=criterion, explain=explain, background=background,
                  top_k=top_k, mode_masks=mode_masks, verifier=verifier,
                  refine_masks=refine_masks, classifier=backbone, choose=choose)  # fmt: skip


def parse_activations(
    gm: GenerativeModel,
    bu: Mapping[str, torch.Tensor],
    *,
    image: torch.Tensor | None = None,
    max_objects: int | None = None,
    query: Query | None = None,
    beam: int = 1,
    threshold: float | None = None,
    criterion: StopCriterion | None = None,
    explain: str | None = None,
    background: str | None = None,
    top_k: int = DEFAULT_TOP_K,
    mode_masks: bool = False,
    verifier: DescentVerifier | Mapping[str, DescentVerifier] | None = None,
    refine_masks: bool = False,
    choose: HeadChoice | None = None,
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
    return _parse(gm, [(img, [view], bu0)], max_objects=max_objects, query=query, beam=beam,
                  threshold=threshold, criterion=criterion, explain=explain, background=background,
                  top_k=top_k, mode_masks=mode_masks, verifier=verifier,
                  refine_masks=refine_masks, classifier=gm.backbone, choose=choose)[0]  # fmt: skip


@dataclass
class _Scene:
    """One image of a batch being parsed: its scan, its paths, and its parse once stopped."""

    img: torch.Tensor  # (3, H, W)
    views: list[View]
    occluder: torch.Tensor | None  # (H, W) bool
    paths: list[_Path]
    result: SceneParse | None = None

    @property
    def size(self) -> tuple[int, int]:
        return int(self.img.shape[-2]), int(self.img.shape[-1])


def _parse(
    gm: GenerativeModel,
    scenes: list[tuple[torch.Tensor, list[View], dict[str, torch.Tensor]]],
    *,
    max_objects: int | None,
    query: Query | None,
    beam: int,
    threshold: float | None,
    criterion: StopCriterion | None,
    explain: str | None,
    background: str | None,
    top_k: int,
    mode_masks: bool = False,
    verifier: DescentVerifier | Mapping[str, DescentVerifier] | None = None,
    refine_masks: bool = False,
    classifier: Backbone | None = None,
    choose: HeadChoice | None = None,
) -> list[SceneParse]:
    """The parse loop of a batch of images ``(image (3, H, W), views, bottom-up maps level →
    (V, C, h, w))``, one step of every image still parsing per iteration. ``classifier``: the
    backbone whose head gives a criterion's ``class_log_prob``."""
    if max_objects is not None:
        _check_int("max_objects", max_objects, 0)
    _check_int("beam", beam, 1)
    _check_int("top_k", top_k, 1)
    query = Query() if query is None else query
    if not isinstance(query, Query):
        raise TypeError(f"query must be a pyro_backpass.parsing.Query, got {type(query).__name__}")
    verifiers = None if verifier is None else _verifiers(gm, verifier, query)
    if verifiers is not None and len({id(v) for v in verifiers.values()}) == 1:
        verifier = next(iter(verifiers.values()))  # one verifier: its own stop criterion
    elif verifiers is not None:
        verifier = None  # several: no criterion was fitted on their parses
    if choose is not None:
        _check_choice(gm, choose, classifier)
    if refine_masks and getattr(gm, "mask_readout", None) is None:
        raise ValueError("refine_masks needs a model with a mask readout (the CRF's unary term)")
    if choose is not None and choose.refined_heads and not refine_masks:
        raise ValueError("a HeadChoice with refined_heads reads the masks refine_masks=True "
                         "reports: pass refine_masks=True")  # fmt: skip
    fitted = default_threshold(
        gm, verifier=verifier, top_k=top_k, choose=choose, refine_masks=refine_masks
    )
    threshold = fitted["threshold"] if threshold is None else float(threshold)
    criterion = fitted["criterion"] if criterion is None else criterion
    if not isinstance(criterion, StopCriterion):
        raise TypeError(f"criterion must be a StopCriterion, got {type(criterion).__name__}")
    if criterion.needs_class_log_prob:
        _check_classifier(gm, classifier)
    how = fitted["explain_away"] if explain is None else explain
    background = fitted["background"] if background is None else background
    if background not in BACKGROUNDS:
        raise ValueError(f"background={background!r}; choose one of {BACKGROUNDS}")
    thresholds = {n: float(gm.observations[n].threshold) for n in gm.hidden_levels}
    batch = [_start(gm, img, views, bu0, query) for img, views, bu0 in scenes]

    cap = MAX_STEPS if max_objects is None else max_objects
    if query.imagine:
        cap = min(cap, 1)
    step = 0
    while True:
        live = []
        for s in batch:
            if s.result is not None:
                continue
            active = [p for p in s.paths if p.done is None]
            if active and step >= cap:
                if query.imagine:
                    reason = "imagined"
                elif max_objects is not None and step >= max_objects:
                    reason = "max_objects"
                else:
                    reason = "step_limit"
                for p in active:
                    p.done = reason
                active = []
            if not active:
                s.result = _result(s, threshold=threshold, beam=beam, criterion=criterion)
            else:
                live.append((s, active))
        if not live:
            break
        # One batch: every view of every active path of every image still parsing.
        units = [(si, s, p) for si, (s, active) in enumerate(live) for p in active]
        rows = [StepRow(path=u, scene=si, view=v, frame=frame, size=s.size)
                for u, (si, s, _) in enumerate(units)
                for v, frame in enumerate(s.views)]  # fmt: skip
        bu = {n: torch.cat([p.bu[n] for _, _, p in units]) for n in units[0][2].bu}  # (R, C, h, w)
        obs = {n: torch.cat([p.observed[n] for _, _, p in units]) for n in units[0][2].observed}
        cands = step_candidates(gm, bu, obs, rows, query, top_k=top_k,
                                profile=background == "profile")  # fmt: skip
        by_path: dict[int, list[Candidate]] = {}
        for c in cands:
            by_path.setdefault(c.path, []).append(c)
        if verifiers is not None:
            verify_candidates(gm, cands, verifiers)
        if verifiers is not None or choose is not None:
            _head_order(gm, by_path, units, criterion, classifier, choose=choose)
        # Decide per path what stops and what needs completing, then complete all at once.
        plans = []  # (scene, path, its candidates best first, the ones to complete)
        force = query.imagine and step == 0
        for u, (_, s, p) in enumerate(units):
            # Best first by LLR; with a verifier or a choice, in the order _head_order made.
            mine = by_path.get(u, [])
            if verifiers is None and choose is None:
                mine = sorted(mine, key=lambda c: -c.llr)
            plans.append((s, p, mine, _to_complete(mine, query, beam=beam)))
        complete_candidates(gm, [c for *_, pool in plans for c in pool])
        new_paths: dict[int, list[tuple[float, _Path, Candidate | None]]] = {
            id(s): [(p.score, p, None) for p in s.paths if p.done is not None] for s, _ in live
        }
        chosen_all = []
        for s, p, mine, pool in plans:
            out = new_paths[id(s)]
            if not mine:
                out.append((p.score, p, None))
                p.done, p.stop_score = "no_hypothesis", None
                continue
            for c in pool:  # the stop statistic of each completed candidate, on this path
                c.stat = _statistic(gm, criterion, c, p, s, classifier)
            # The stop is decided on the best mode by LLR, as the criterion was fitted (with a
            # verifier: on the head of _verified_order); a query's preference or a beam then
            # picks among the completed modes above the threshold.
            if pool[0].stat <= threshold and not force:
                p.done, p.stop_score = "below_threshold", pool[0].stat
                out.append((p.score, p, None))
                continue
            eligible = [pool[0]] + [c for c in pool[1:] if c.stat > threshold]
            chosen = _choose(eligible, query, beam=beam, image=s.img)
            chosen_all += chosen
            for c in chosen:
                # Σ (statistic − t); with t = −inf (never stop) the plain Σ statistic.
                gain = c.stat - threshold if math.isfinite(threshold) else c.stat
                out.append((p.score + gain, p, c))
            if not force and math.isfinite(threshold):  # stopping is a path too (beam > 1)
                out.append((p.score, _stopped(p, pool[0].stat), None))
        if mode_masks:  # the step's modes in each instance's view (Fig. 5's marks)
            rows_of = {c.row: [d for d in cands if d.row == c.row] for c in chosen_all}
            complete_candidates(gm, [d for row in rows_of.values() for d in row])
            for c in chosen_all:
                c.mode_masks = [d.amodal for d in rows_of[c.row]]
        for s, _ in live:
            ranked = sorted(new_paths[id(s)], key=lambda t: -t[0])
            s.paths = [
                p
                if c is None
                else _extend(
                    gm, p, c, s, score=score, how=how, thresholds=thresholds, refine=refine_masks
                )  # fmt: skip
                for score, p, c in ranked[:beam]
            ]
        step += 1
    return [s.result for s in batch]


def _head_order(
    gm: GenerativeModel, by_path: dict[int, list[Candidate]], units: list,
    criterion: StopCriterion, classifier: Backbone | None, *, choose: HeadChoice | None,
) -> None:  # fmt: skip
    """Order each path's candidates by per-category heads, in place. Each (row, category)
    group's best — by the verifier's score when the parse verifies (its scores compare
    descents of one category on one row only: it was fitted on such lists, and its listwise
    loss leaves a constant per list free), else by LLR — is completed (with ``choose`` of
    ``per_category`` m > 1: its m best whose amodal masks differ, :func:`_distinct_heads`),
    and these heads are ordered by the stop statistic (a calibrated log-odds of "new
    object", comparable across rows and categories) or, with ``choose``, by its choice
    score; the other candidates follow, best first within their group."""
    ranked_of: dict[int, list[list[Candidate]]] = {}
    for u, mine in by_path.items():
        groups: dict[tuple[int, int], list[Candidate]] = {}
        for c in mine:  # candidates arrive in greedy's order: ties keep the lower rank
            groups.setdefault((c.row, c.assignment["category"]), []).append(c)
        ranked_of[u] = [sorted(g, key=lambda c: -(c.llr if c.verified is None else c.verified))
                        for g in groups.values()]  # fmt: skip
    m = 1 if choose is None else choose.per_category
    if m > 1:  # the masks that tell a group's heads apart, in one batched pass
        complete_candidates(gm, [c for ranked in ranked_of.values() for g in ranked
                                 for c in g[: HEAD_POOL * m]])  # fmt: skip
    heads_all = []
    for u, ranked in ranked_of.items():
        heads = [c for g in ranked for c in _distinct_heads(g, m)]
        heads_all += [(u, c) for c in heads]
        taken = {id(c) for c in heads}
        by_path[u] = heads + [c for g in ranked for c in g if id(c) not in taken]
    complete_candidates(gm, [c for _, c in heads_all])
    if choose is not None and choose.refined_heads:  # the masks the instance would report
        for u, c in heads_all:
            _refine(gm, c, units[u][1])
    key: dict[int, float] = {}
    for u, c in heads_all:
        _, s, p = units[u]
        c.stat = _statistic(gm, criterion, c, p, s, classifier)
        key[id(c)] = c.stat if choose is None else _choice_score(gm, choose, c, p, s, classifier)
    for u, mine in by_path.items():
        n_heads = sum(1 for v, _ in heads_all if v == u)
        heads = sorted(mine[:n_heads], key=lambda c: -key[id(c)])
        by_path[u] = heads + mine[n_heads:]
        if choose is not None:  # what the step chose among (ParsedInstance.heads)
            _, s, p = units[u]
            shown = [_head_record(c, key[id(c)], p, s) for c in heads]
            for c in heads:
                c.heads = shown


def _distinct_heads(group: list[Candidate], m: int) -> list[Candidate]:
    """The heads of one (row, category) group, ranked best first: its first and, for m > 1,
    the next ones of its ``HEAD_POOL * m`` best (completed) whose amodal masks overlap every
    head taken before by IoU < ``HEAD_IOU``, up to m."""
    if m == 1:
        return group[:1]
    heads: list[Candidate] = []
    for c in group[: HEAD_POOL * m]:
        if all(_iou(c.amodal, d.amodal) < HEAD_IOU for d in heads):
            heads.append(c)
            if len(heads) == m:
                break
    return heads


def _head_record(c: Candidate, score: float, p: _Path, s: _Scene) -> dict:
    """One head as :attr:`ParsedInstance.heads` shows it (the masks its choice read)."""
    _, visible = _regions(c, p, s, refined=c.refined is not None)
    amodal = c.amodal if c.refined is None else c.refined  # as computed, occluder included
    return {**c.choice_inputs, "score": float(score), "mask": visible, "amodal_mask": amodal}


def _verifiers(gm: GenerativeModel, verifier: Any, query: Query) -> dict[int, DescentVerifier]:
    """Category index → the verifier of each category this parse can choose (the query's, or
    all), from one verifier or a mapping category name → verifier; a clear error for an
    unknown category, a verifier for another model, or a category without weights."""
    if query.category is not None:
        c = query.category
        need = [c if isinstance(c, str) else gm.categories[int(c)]]
    elif query.categories is not None:
        need = [c for c, w in query.categories.items() if w > 0]
    else:
        need = list(gm.categories)
    if isinstance(verifier, Mapping):
        unknown = [c for c in verifier if c not in gm.categories]
        if unknown:
            raise ValueError(f"verifier maps unknown categories {unknown}; the model's are "
                             f"{list(gm.categories)}")  # fmt: skip
        uncovered = [c for c in need if c not in verifier]
        if uncovered:
            raise ValueError(
                f"verifier maps no verifier to {uncovered}, which this parse can "
                "choose (attend to the mapped ones with Query(category=...))"
            )
        by_name = {c: verifier[c] for c in need}
    else:
        by_name = dict.fromkeys(need, verifier)
    for v in {id(v): v for v in by_name.values()}.values():
        check_verifier(gm, v)
    missing = [n for n, v in by_name.items() if not bool(v.fitted[gm.categories.index(n)])]
    if missing:
        fitted = sorted({c for v in by_name.values() for c in v.fitted_categories})
        raise ValueError(
            f"the verifier has no weights for {missing}, which this parse can choose; it was "
            f"fitted for {fitted} (attend to one with Query(category=...), or fit the others)"
        )
    return {gm.categories.index(name): v for name, v in by_name.items()}


def _start(
    gm: GenerativeModel, img: torch.Tensor, views: list[View], bu0: dict[str, torch.Tensor],
    query: Query,
) -> _Scene:  # fmt: skip
    """One image's state before the first step: one empty path, an occluder's elements
    unobserved in every view."""
    height, width = img.shape[-2:]
    occluder = None
    observed0 = {n: torch.ones_like(x, dtype=torch.bool) for n, x in bu0.items()}
    if query.occluder is not None:
        occluder = torch.as_tensor(query.occluder, dtype=torch.bool).cpu()
        if tuple(occluder.shape) != (height, width):
            raise ValueError(
                f"occluder mask is {tuple(occluder.shape)}; the image is {(height, width)}"
            )
        view_occ = torch.stack([v.from_image(occluder) for v in views]).to(gm.device)
        for name, m in _level_masks(gm, view_occ).items():
            if name in observed0:
                observed0[name] = observed0[name] & ~m
    path = _Path(bu0, observed0, torch.zeros(height, width, dtype=torch.bool))
    return _Scene(img, views, occluder, [path])


def _result(s: _Scene, *, threshold: float, beam: int, criterion: StopCriterion) -> SceneParse:
    best = max(s.paths, key=lambda p: p.score)
    return SceneParse(
        instances=list(best.instances),
        stop_reason=best.done or "step_limit",
        image=s.img,
        threshold=threshold,
        stop_score=best.stop_score,
        beam=beam,
        criterion=criterion.to_dict(),
    )


def _check_classifier(gm: GenerativeModel, classifier: Backbone | None) -> None:
    """A criterion weighing ``class_log_prob`` needs a classifier that knows the model's
    categories."""
    if classifier is None or getattr(classifier, "head", None) is None:
        raise ValueError("the stop criterion weighs class_log_prob, which needs a backbone with "
                         "a classifier head (gm.backbone or backbone=)")  # fmt: skip
    missing = [c for c in gm.categories if c not in classifier.categories]
    if missing:
        raise ValueError(f"the stop criterion weighs class_log_prob, but the backbone's "
                         f"classifier does not know the categories {missing}")  # fmt: skip


def _refine(gm: GenerativeModel, c: Candidate, s: _Scene) -> torch.Tensor:
    """Candidate ``c``'s amodal mask ``(H, W)`` refined by the colour CRF in its view (computed
    once: ``c.refined``)."""
    if c.refined is None:
        view = s.views[c.view]
        crf = crf_mask(gm, c.td, c.bu, view.image, observed=c.obs)  # (1, S, S)
        c.refined = view.to_image(crf[0].cpu(), *s.size)
    return c.refined


def _regions(
    c: Candidate, p: _Path, s: _Scene, *, refined: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate ``c``'s amodal and visible masks ``(H, W)`` in image space on path ``p`` (the
    readout's, or with ``refined`` its CRF-refined ones): the occluder's pixels count neither
    as visible nor in the amodal mask, so an occluded object is not read as "already
    claimed"."""
    amodal = c.refined if refined else c.amodal
    if s.occluder is not None:
        amodal = amodal & ~s.occluder
    return amodal, amodal & ~p.claimed


def _statistic(
    gm: GenerativeModel, criterion: StopCriterion, c: Candidate, p: _Path, s: _Scene,
    classifier: Backbone | None,
) -> float:  # fmt: skip
    """The stop statistic of candidate ``c`` on path ``p``. Pixels are counted in its view's
    frame (the model's input, where the criterion was fitted), so the statistic is comparable
    across image sizes and scales (see :func:`_regions`). A criterion that weighs
    ``class_log_prob`` reads the visible region in the candidate's view."""
    amodal, visible = _regions(c, p, s)
    per_pixel = s.views[c.view].factor ** 2  # view pixels per image pixel
    class_log_prob = None
    if criterion.needs_class_log_prob:
        assert classifier is not None  # _check_classifier ran
        view = s.views[c.view]
        name = gm.categories[int(c.assignment["category"])]
        mask = view.from_image(visible)[None]  # (1, S, S)
        index = [classifier.categories.index(name)]
        class_log_prob = float(region_log_prob(classifier, view.image, mask, index)[0])
    c.stop_inputs = {
        "llr": float(c.llr),
        "visible": float(visible.sum()) * per_pixel,
        "amodal": float(amodal.sum()) * per_pixel,
        "step": len(p.instances),
    }
    if class_log_prob is not None:
        c.stop_inputs["class_log_prob"] = class_log_prob
    return criterion.statistic(**c.stop_inputs)


def _choice_score(
    gm: GenerativeModel, choose: HeadChoice, c: Candidate, p: _Path, s: _Scene,
    classifier: Backbone | None,
) -> float:  # fmt: skip
    """The :class:`HeadChoice` score of head ``c`` on path ``p``: its features counted in its
    view's frame, the classifier read on its visible region in its view."""
    assert classifier is not None  # _check_choice ran
    amodal, visible = _regions(c, p, s, refined=choose.refined_heads)
    view = s.views[c.view]
    per_pixel = view.factor**2
    cats = list(gm.categories)
    mask = view.from_image(visible)[None].expand(len(cats), -1, -1)  # (C, S, S)
    index = [classifier.categories.index(name) for name in cats]
    logp = region_log_prob(classifier, view.image, mask, index).tolist()
    c.choice_inputs = {"category": cats[int(c.assignment["category"])], "llr": float(c.llr),
                       "visible": float(visible.sum()) * per_pixel,
                       "amodal": float(amodal.sum()) * per_pixel,
                       "class_log_probs": dict(zip(cats, logp, strict=True))}  # fmt: skip
    return choose.score_head(**c.choice_inputs)


def _check_choice(gm: GenerativeModel, choose: Any, classifier: Backbone | None) -> None:
    """A head choice must be one, fitted for this model's categories (and this model, when it
    names one), with a classifier that knows them."""
    if not isinstance(choose, HeadChoice):
        raise TypeError(f"choose must be a pyro_backpass.parsing.HeadChoice, "
                        f"got {type(choose).__name__}")  # fmt: skip
    if tuple(choose.categories) != tuple(gm.categories):
        raise ValueError(f"the head choice was fitted for the categories "
                         f"{list(choose.categories)}; the model has "
                         f"{list(gm.categories)}")  # fmt: skip
    if choose.model_sha256 is not None and choose.model_sha256 != model_fingerprint(gm):
        raise ValueError("the head choice was fitted for another model (its model_sha256 "
                         "differs); fit one for this model "
                         "(benchmarks/fit_head_choice.py)")  # fmt: skip
    if classifier is None or getattr(classifier, "head", None) is None:
        raise ValueError("a head choice reads the classifier: it needs a backbone with a "
                         "classifier head (gm.backbone or backbone=)")  # fmt: skip
    missing = [c for c in gm.categories if c not in classifier.categories]
    if missing:
        raise ValueError(f"the backbone's classifier does not know the categories {missing}")


def _stopped(p: _Path, stop_score: float) -> _Path:
    return _Path(p.bu, p.observed, p.claimed, list(p.instances), p.score, "below_threshold",
                 stop_score)  # fmt: skip


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def _to_complete(mine: list[Candidate], query: Query, *, beam: int) -> list[Candidate]:
    """The candidates (best first by LLR) a step completes and :func:`_choose` reads."""
    if query.prefer is not None:
        return mine
    return mine[:1] if beam == 1 else mine[: 4 * beam]


def _choose(
    eligible: list[Candidate], query: Query, *, beam: int, image: torch.Tensor
) -> list[Candidate]:
    """The candidates a path is extended with, among completed ones (best first by LLR): the
    preferred one (a query's preference), else the ``beam`` best by stop statistic (the paths'
    score) that are not the same object (amodal IoU < 0.5 with a better one); with ``beam=1``,
    the best mode by LLR."""
    if query.prefer is not None:
        return [max(eligible, key=lambda c: (_preference_key(query.prefer, c.amodal, image),
                                             c.llr))]  # fmt: skip
    chosen: list[Candidate] = []
    for c in sorted(eligible, key=lambda c: -c.stat) if beam > 1 else eligible:
        if all(_iou(c.amodal, d.amodal) < 0.5 for d in chosen):
            chosen.append(c)
        if len(chosen) == beam:
            break
    return chosen


def _extend(
    gm: GenerativeModel, p: _Path, c: Candidate, s: _Scene, *, score: float, how: str,
    thresholds: dict[str, float], refine: bool = False,
) -> _Path:  # fmt: skip
    """A new path: ``p`` with candidate ``c`` as its next instance, explained away; with
    ``refine``, its masks are the readout's refined by the colour CRF in its view
    (:func:`~pyro_backpass.inference.crf_mask`; the step's choice and stop statistic are
    made before, on the readout's mask)."""
    v, views, (height, width) = c.view, s.views, s.size
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
    amodal = _refine(gm, c, s) if refine else c.amodal
    visible = amodal & ~p.claimed
    if s.occluder is not None:
        visible = visible & ~s.occluder
    view = views[v]
    instance = ParsedInstance(
        category=gm.categories[c.assignment["category"]],
        mask=visible,
        amodal_mask=amodal,
        score=c.stat,
        reconstruction=view.to_image(c.td["image"][0].detach().cpu(), height, width),
        modes=c.modes,
        mode_scores=[d_lj - (c.log_joint - c.llr) for _, d_lj in c.modes],
        mode_masks=torch.stack(c.mode_masks) if c.mode_masks else None,
        log_joint=c.log_joint,
        assignment=dict(c.assignment),
        scale=view.scale,
        view=v,
        llr=c.llr,
        stop_inputs=None if c.stop_inputs is None else dict(c.stop_inputs),
        heads=None if c.heads is None else [dict(h) for h in c.heads],
    )
    return _Path(bu, observed, p.claimed | visible, [*p.instances, instance], score)
