"""One step of a parse as batched backward passes: the rows of the batch are every view of
every active parse path — of one image, or of many images parsed together — and each row's
top-k posterior modes become :class:`Candidate` s scored by their log-likelihood ratio against
background; :func:`complete_candidates` completes the chosen ones down to the image in one
batched top-down pass.

Rows do not interact inside :func:`~pyro_backpass.greedy_map`, the background likelihood or the
top-down pass, so a row's result does not depend on which other rows share its batch (up to
floating-point rounding of batched kernels).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pyro_backpass.inference.background import background_log_likelihood
from pyro_backpass.inference.greedy import greedy_map
from pyro_backpass.inference.objective import object_mask, top_down_pass
from pyro_backpass.inference.verification import choice_scores, descent_features
from pyro_backpass.model.descent_verifier import DescentVerifier
from pyro_backpass.parsing.query import Query, location_prior
from pyro_backpass.parsing.views import View

if TYPE_CHECKING:
    from pyro_backpass.model.generative_model import GenerativeModel

__all__ = ["Candidate", "StepRow", "complete_candidates", "step_candidates", "verify_candidates"]


@dataclass(frozen=True)
class StepRow:
    """What one row of a step's batch is: a view of an active parse path of one image."""

    path: int  # the path's index in the step's list of active paths (all images)
    scene: int  # the image's index in the batch of images
    view: int  # the view's index in its image's scan
    frame: View  # the view itself (where it lies in its image)
    size: tuple[int, int]  # (H, W) of its image


@dataclass
class Candidate:
    """One posterior mode of one row: a hypothesis for the next instance of a path."""

    path: int
    view: int
    row: int  # row of the stacked batch it came from
    llr: float
    log_joint: float
    assignment: dict[str, int]
    modes: list
    frame: View
    size: tuple[int, int]  # (H, W) of its image
    bu: dict[str, torch.Tensor] | None = None  # level -> (1, C, H, W): its view's maps
    obs: dict[str, torch.Tensor] | None = None  # level -> (1, C, H, W) bool
    td: dict[str, torch.Tensor] | None = None  # level -> (1, C, H, W), view space
    amodal: torch.Tensor | None = None  # (H, W) image space
    refined: torch.Tensor | None = None  # (H, W) image space: amodal refined by the colour CRF
    mode_masks: list[torch.Tensor] | None = None  # amodal masks of its row's modes
    stat: float | None = None  # the stop statistic on its path (StopCriterion), once completed
    stop_inputs: dict[str, float] | None = None  # what ``stat`` read (stop_features' kwargs)
    verified: float | None = None  # its DescentVerifier score, when the parse verifies
    choice_inputs: dict | None = None  # what a HeadChoice read of it (head_features' kwargs)
    heads: list[dict] | None = None  # its path's heads this step, with a choice (ParsedInstance)


def step_candidates(
    gm: GenerativeModel,
    bu: dict[str, torch.Tensor],
    observed: dict[str, torch.Tensor],
    rows: list[StepRow],
    query: Query,
    *,
    top_k: int,
    profile: bool,
) -> list[Candidate]:
    """Every row's top-k modes with their log-likelihood ratios against background.

    :param bu: level → ``(R, C, h, w)``, the rows' current bottom-up maps.
    :param observed: level → ``(R, C, h, w)`` bool.
    :param rows: what each of the R rows is.
    :param profile: the background explanation (see :func:`background_log_likelihood`).

    One :func:`greedy_map` call for all rows; with a location preference, one per view of
    each image (where the place falls differs between views).
    """
    base_priors = {}
    cat_prior = query.category_prior(gm)
    if cat_prior is not None:
        base_priors["category"] = cat_prior
    top = gm.hidden_levels[-1]
    place = query.place
    groups: dict[tuple[int, int], list[int]] = {}
    for r, row in enumerate(rows):  # first-seen order: paths in order within each group
        key = (0, 0) if place is None else (row.scene, row.view)
        groups.setdefault(key, []).append(r)
    k = min(top_k, gm.site_sizes["category"] * gm.site_sizes[f"gamma_{top}"]
            * gm.site_sizes[f"delta_{top}"])  # fmt: skip
    k = max(k, 2)  # top_k > 1 so that modes are listed
    out = []
    for members in groups.values():
        priors = dict(base_priors)
        if place is not None:
            first = rows[members[0]]
            priors[f"delta_{top}"] = location_prior(
                gm, place, weight=query.location_weight, view_box=first.frame.box(*first.size)
            )
        idx = torch.tensor(members, device=gm.device)
        sub_bu = {n: x[idx] for n, x in bu.items()}  # (R', C, h, w)
        sub_obs = {n: m[idx] for n, m in observed.items()}
        result = greedy_map(gm, sub_bu, category=query.category, priors=priors or None,
                            observed=sub_obs, top_k=k)  # fmt: skip
        bg = background_log_likelihood(gm, sub_bu, observed=sub_obs, profile=profile)  # (R',)
        for j, r in enumerate(members):
            row, modes = rows[r], result.modes[j]
            for assignment, lj in modes:
                if not math.isfinite(lj):
                    continue
                out.append(Candidate(path=row.path, view=row.view, row=r,
                                     llr=lj - float(bg[j]), log_joint=lj,
                                     assignment=assignment, modes=modes, frame=row.frame,
                                     size=row.size))  # fmt: skip
    for c in out:
        c.bu = {n: x[c.row : c.row + 1] for n, x in bu.items()}
        c.obs = {n: m[c.row : c.row + 1] for n, m in observed.items()}
    return out


def complete_candidates(gm: GenerativeModel, cands: list[Candidate]) -> None:
    """F̂_td of each candidate not yet completed (its full assignment) and its amodal mask in
    image space, in one batched top-down pass over all of them (any rows, any images)."""
    todo = [c for c in cands if c.td is None]
    if not todo:
        return
    values = {s: torch.tensor([c.assignment[s] for c in todo], device=gm.device)
              for s in todo[0].assignment}  # fmt: skip  # site -> (n,)
    if len({c.row for c in todo}) == 1:  # one row: a view of its maps, no copy
        bu = {k: x.expand(len(todo), *x.shape[1:]) for k, x in todo[0].bu.items()}
        obs = {k: m.expand(len(todo), *m.shape[1:]) for k, m in todo[0].obs.items()}
    else:
        bu = {k: torch.cat([c.bu[k] for c in todo]) for k in todo[0].bu}  # (n, C, H, W)
        obs = {k: torch.cat([c.obs[k] for c in todo]) for k in todo[0].obs}
    with torch.no_grad():
        td, _ = top_down_pass(gm, values, bu, obs)
    masks = object_mask(gm, td, bu, obs).cpu()  # (n, S, S)
    for j, c in enumerate(todo):
        c.td = {k: v[j : j + 1] for k, v in td.items()}
        c.amodal = c.frame.to_image(masks[j], *c.size)


def verify_candidates(
    gm: GenerativeModel, cands: list[Candidate], verifiers: Mapping[int, DescentVerifier]
) -> None:
    """Each candidate's verifier score (``.verified``) by the
    :class:`~pyro_backpass.model.DescentVerifier` of its category (``verifiers``: category index
    → verifier), from its :func:`~pyro_backpass.inference.descent_features` on its row's current
    maps (the objects found before it explained away); one feature pass per row and feature
    kind (read levels, CRF-refined masks or not).

    A verifier with a ``consensus`` temperature τ scores each candidate by its expected mask
    IoU with the other candidates of its row and category under softmax(score / τ), as
    :func:`~pyro_backpass.verified_map` chooses (:func:`~pyro_backpass.inference.expected_iou`);
    its ``refine_masks`` computes the features, and that vote, on the CRF-refined masks."""
    rows: dict[tuple[int, tuple[str, ...], bool], list[Candidate]] = {}
    for c in cands:
        v = verifiers[int(c.assignment["category"])]
        rows.setdefault((c.row, tuple(v.read_levels), v.refine_masks), []).append(c)
    for (_, read_levels, refine), mine in rows.items():
        values = {s: torch.tensor([c.assignment[s] for c in mine], device=gm.device)
                  for s in mine[0].assignment}  # fmt: skip
        lj = torch.tensor([c.log_joint for c in mine], dtype=torch.float64)
        x, masks = descent_features(gm, mine[0].bu, values, lj, read_levels=read_levels,
                                    observed=mine[0].obs, refine=refine)  # fmt: skip
        x, masks = x.cpu(), masks.cpu()  # (k, F), (k, H, W)
        groups: dict[int, list[int]] = {}
        for j, c in enumerate(mine):
            groups.setdefault(int(c.assignment["category"]), []).append(j)
        for cat, idx in groups.items():
            score = choice_scores(verifiers[cat], x[idx], masks[idx], cat)  # (n,)
            for j, s in zip(idx, score.tolist(), strict=True):
                mine[j].verified = float(s)
