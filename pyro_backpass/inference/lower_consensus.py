"""The levels below a kept top level chosen by consensus (issue #10, rung (b)): an option after
any backward pass.

Greedy's descent below a good top level is often not the best of its completions: with the top
level clamped to the truth, the best of the 225 joint (γ, δ) of the two levels under it
(:func:`~pyro_backpass.inference.lower_completions`) covers the airplane far better than
greedy's own (mean IoU 0.78 against 0.47 on test scenes, every mask refined by the colour CRF),
while the largest log-joint among them is the worst choice of all (0.12): the model's own score
prefers completions that cover clutter. The completions agree where the object is, though, so
the *consensus* — the completion whose CRF-refined mask has the highest mean IoU with all of
them, itself included (:func:`~pyro_backpass.inference.expected_iou` under the uniform
distribution, the minimum-Bayes-risk choice for mask IoU when no completion is trusted more
than another) — is better than greedy's own (0.57 against 0.47;
``benchmarks/lower_consensus.py``), 0.59 with the completions whose refined mask is empty left
out of the vote, and 0.64 with the vote weighted by the refined descent verifier's scores
(``verifier=``; on validation scenes the same four read 0.44 greedy, 0.50, 0.50 and 0.53).
Weighting the completions by their tempered log-joints measured no better than the largest
log-joint.

This is **not** the model's MAP: the returned descent is neither the largest log-joint nor the
greedy one; its ``log_joint`` is its own.

Use it below a top level that is right (clamped to a known object, as on rung (b)); below the
top level a pass *chose* it hurts. After :func:`~pyro_backpass.verified_map` with the refined
verifier, whose choice was of a whole descent, the share of test scenes whose refined mask
covers an airplane falls from 0.85 to 0.53 (0.78 with the vote weighted by that verifier;
``benchmarks/consensus_below.py``): when the chosen top level is only near the airplane, most
completions under it miss it, and the consensus follows them onto clutter or an empty mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from pyro_backpass.inference.greedy import greedy_map
from pyro_backpass.inference.lower_choice import lower_completions, lower_levels
from pyro_backpass.inference.mask_refine import crf_mask
from pyro_backpass.inference.verification import (
    check_verifier,
    expected_iou,
    lower_descent_features,
)
from pyro_backpass.model.checks import check_bu, check_clamp, check_observed
from pyro_backpass.results import MapResult

if TYPE_CHECKING:
    from pyro_backpass.model.descent_verifier import DescentVerifier
    from pyro_backpass.model.generative_model import GenerativeModel
    from pyro_backpass.model.priors import SitePrior

__all__ = ["LOWER_TEMPERATURE", "consensus_below"]

#: The temperature of ``consensus_below(..., verifier=DescentVerifier.shipped(refined=True))``,
#: chosen on validation scenes among 0.125 … 32 (``benchmarks/lower_consensus.py --verifier``).
LOWER_TEMPERATURE = 4.0


@torch.no_grad()
def consensus_below(
    gm: GenerativeModel,
    bu: Mapping[str, torch.Tensor],
    result: MapResult,
    *,
    levels_below: int = 2,
    skip_empty: bool = True,
    verifier: DescentVerifier | None = None,
    temperature: float = LOWER_TEMPERATURE,
    clamp: Mapping[str, int] | None = None,
    priors: Mapping[str, SitePrior] | None = None,
    observed: Mapping[str, torch.Tensor] | None = None,
) -> MapResult:
    """``result``'s category and top level kept, and the ``levels_below`` levels under it chosen
    by consensus among their completions.

    For each image, every joint (γ, δ) of the ``levels_below`` hidden levels under the top is
    completed greedily below ``result``'s top level
    (:func:`~pyro_backpass.inference.lower_completions`; those a prior forbids are dropped), each
    completion's mask is refined by the colour CRF
    (:func:`~pyro_backpass.inference.crf_mask`, its defaults, on the image level clipped to
    [0, 1]), and the completion whose refined mask has the highest mean IoU with all of them
    (itself included; :func:`~pyro_backpass.inference.expected_iou`, uniform weights; with a
    ``verifier``, the weights softmax(score / ``temperature``) of its scores of each
    completion's :func:`~pyro_backpass.inference.descent_features`; ties: the first
    enumerated) is returned, every site of it clamped and completed again.

    :param bu: level → ``(B, C, H, W)``: the activations ``result`` explained, with the
        ``image`` level (the CRF's colours) and every hidden level.
    :param result: a backward pass of ``bu`` (:func:`~pyro_backpass.greedy_map`, e.g. with the
        top level clamped, or :func:`~pyro_backpass.verified_map`).
    :param levels_below: how many levels under the top are enumerated (2 on the default model:
        5 γ × 1 δ at ``conv4_1`` and 5 γ × 9 δ at ``pool3``, 225 completions an image).
    :param skip_empty: leave out the completions whose refined mask is empty (all of them are
        kept if every one is): empty masks agree perfectly with each other, so where many
        completions show nothing they would outvote every mask that shows something.
    :param verifier: a :class:`~pyro_backpass.DescentVerifier` of refined masks
        (``refine_masks``; fitted for the result's categories) whose scores weigh the vote; None:
        uniform weights. With the top level clamped to the airplane, on test scenes:
        ``DescentVerifier.shipped(refined=True)`` at the default ``temperature`` 0.638 mean IoU,
        uniform 0.586, greedy's own completion 0.465 (validation: 0.528 / 0.495 / 0.436;
        ``benchmarks/lower_consensus.py --verifier``).
    :param temperature: of the verifier's softmax (unused without one); the default
        (:data:`LOWER_TEMPERATURE`) was chosen on validation for the shipped refined verifier
        among 0.125 … 32 (8, 16 and 32 read 0.518, 0.513 and 0.524 against 4's 0.528).
    :param clamp, priors, observed: as given to the pass (clamps on the top level or the
        category must agree with ``result``; those on lower sites are kept).
    :returns: a :class:`~pyro_backpass.MapResult` of batch B: the chosen completions, their
        log-joints and the mask readout's masks (:func:`~pyro_backpass.refine_mask` of it gives
        the refined masks the choice was made by); ``modes`` are ``result``'s.

    Cost: on the default model 225 completions and 225 CRFs an image, about 12 s on one CPU
    thread (``benchmarks/consensus_below.py`` times it; more with a verifier, which reads the
    features of 225 descents). Below a top level that a pass chose rather than one known to be
    right it lowers the hit rate (see the module's note).

    Example::

        gm = GenerativeModel.default()
        scene = make_scene(seed=3)
        bu = gm.backbone(scene.image[None])
        top = {"gamma_pool4": 2, "delta_pool4": 12}  # a top level known to be right
        first = greedy_map(gm, bu, category="airplane", clamp=top)
        better = consensus_below(gm, bu, first, clamp=top,
                                 verifier=DescentVerifier.shipped(refined=True))
        mask = refine_mask(gm, better, bu, scene.image)  # (1, 64, 64)
    """
    if not isinstance(result, MapResult):
        raise TypeError(f"result must be a MapResult (a backward pass), got "
                        f"{type(result).__name__}")  # fmt: skip
    bu_checked, b = check_bu(gm, bu)
    if "image" not in bu_checked:
        raise ValueError("consensus_below needs the image level in bu (the CRF's colours)")
    missing = [n for n in gm.hidden_levels if n not in bu_checked]
    if missing:
        raise ValueError(f"consensus_below needs every hidden level in bu; missing {missing}")
    lower_levels(gm, levels_below)  # a clear error beyond the model's depth
    if not isinstance(skip_empty, bool):
        raise TypeError(f"skip_empty must be a bool, got {skip_empty!r}")
    if verifier is None:
        temperature = 1.0  # the scores are all 0: uniform weights whatever the temperature
    else:
        if getattr(verifier, "levels_below", 0):
            raise ValueError(
                "consensus_below weighs its vote by a first-stage verifier (one "
                "fitted on whole descents, levels_below=0, e.g. "
                "DescentVerifier.shipped(refined=True)); this one is a second stage"
            )
        check_verifier(gm, verifier)
        if not verifier.refine_masks:
            raise ValueError(
                "consensus_below votes on CRF-refined masks: its verifier must score "
                "them (refine_masks=True, e.g. DescentVerifier.shipped(refined=True))"
            )
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise TypeError(f"temperature must be a number, got {temperature!r}")
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    got = int(result.assignment["category"].shape[0])
    if got != b:
        raise ValueError(f"result has batch {got} but bu has batch {b}: pass the activations "
                         "the result explained")  # fmt: skip
    if verifier is not None:
        check_verifier(gm, verifier, categories=result.assignment["category"])
    top = gm.hidden_levels[-1]
    top_sites = (f"gamma_{top}", f"delta_{top}")
    clamps = check_clamp(gm, clamp, b)  # site → (B,)
    masks_obs = check_observed(gm, observed, bu_checked, b)
    picked = []
    for i in range(b):
        mine = {s: int(v[i]) for s, v in clamps.items()}
        keep = {s: int(result.assignment[s][i]) for s in ("category", *top_sites)}
        clash = [s for s in keep if s in mine and mine[s] != keep[s]]
        if clash:
            raise ValueError(f"image {i}: clamp disagrees with result on {clash}")
        rest = {s: v for s, v in mine.items() if s not in keep}
        one = {name: x[i : i + 1] for name, x in bu_checked.items()}
        obs = {name: m.expand(bu_checked[name].shape)[i : i + 1] for name, m in masks_obs.items()}
        if verifier is None:
            values, masks = _completions(gm, one, keep, levels_below=levels_below, clamp=rest,
                                         priors=priors, observed=obs or None)  # fmt: skip
            score = torch.zeros(len(masks), dtype=torch.float64)
        else:
            values, x, masks = lower_descent_features(
                gm, one, keep, levels_below=levels_below, read_levels=verifier.read_levels,
                clamp=rest, priors=priors, observed=obs or None, refine=True)  # fmt: skip
            score = verifier.score(x.cpu(), keep["category"]).double()  # (m,)
        if len(masks) == 0:
            raise ValueError(f"image {i}: no completion below the kept top level is feasible "
                             "under the clamps and priors")  # fmt: skip
        masks = masks.cpu()  # (m, H, W)
        among = torch.arange(len(masks))
        shows = masks.flatten(1).any(1)  # (m,)
        if skip_empty and shows.any():
            among = shows.nonzero()[:, 0]
        weights = torch.softmax(score[among] / temperature, 0)  # uniform without a verifier
        agree = expected_iou(masks[among], weights)
        j = int(among[int(agree.argmax())])  # argmax: the first of equal maxima
        picked.append({s: int(v[j]) for s, v in values.items()})
    chosen = {s: torch.tensor([a[s] for a in picked], device=gm.device) for s in picked[0]}
    final = greedy_map(gm, bu, priors=priors, observed=observed, clamp=chosen)
    return MapResult(assignment=final.assignment, td=final.td, log_joint=final.log_joint,
                     mask=final.mask, modes=result.modes)  # fmt: skip


def _completions(
    gm: GenerativeModel,
    one: Mapping[str, torch.Tensor],
    keep: Mapping[str, int],
    *,
    levels_below: int,
    clamp: Mapping[str, int],
    priors: Mapping[str, SitePrior] | None,
    observed: Mapping[str, torch.Tensor] | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One image's feasible completions below ``keep``'s top level: every site → ``(m,)``
    indices, and their CRF-refined masks ``(m, H, W)``."""
    top = gm.hidden_levels[-1]
    below = lower_completions(gm, one, category=keep["category"],
                              top={s: keep[s] for s in (f"gamma_{top}", f"delta_{top}")},
                              levels_below=levels_below, clamp=clamp, priors=priors,
                              observed=observed)  # fmt: skip
    ok = torch.isfinite(below.log_joint).nonzero()[:, 0]  # (m,)
    td = {name: x[ok] for name, x in below.td.items()}
    rep = {name: x.expand(len(ok), *x.shape[1:]) for name, x in one.items()}
    rep_obs = {name: m.expand(len(ok), *m.shape[1:]) for name, m in (observed or {}).items()}
    image = one["image"][0].clamp(0, 1)  # (3, H, W)
    masks = crf_mask(gm, td, rep, image, observed=rep_obs or None)  # (m, H, W)
    return {s: v[ok] for s, v in below.assignment.items()}, masks
