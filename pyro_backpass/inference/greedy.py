"""Greedy layer-wise MAP inference: the backward pass (Sec. 2.2.1 of the paper).

Top-down, for each level, every hypothesis (γ, δ) — jointly with the category on the top level
when it is unknown — is scored at once, batched over hypotheses and images::

    score(γ, δ) = log P(γ | upper γ's) + log P(δ) + Σ_i max_{f_i} [log P(f_bu,i | f_i)
                                                                   + log N(f_i; φ_i(γ, δ), σ0)]

(one batched convolution for all K kernel sets, shifts as slices of a padded tensor, the inner
maximum in closed form, eq. 13); the best hypothesis is kept (ties: lowest flat index, i.e.
lowest category, then γ, then δ), F̂^l_td is set to its closed-form maximiser and the pass goes
down. Hypotheses are processed in chunks so peak memory stays bounded when K is large.

Reference: Wang et al. 2016, eqs. (11)–(13).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from pyro_backpass.inference.closed_form import closed_form_with
from pyro_backpass.inference.hypotheses import (
    DEFAULT_CHUNK_ELEMENTS,
    hypothesis_scores,
    template_planes,
)
from pyro_backpass.inference.inputs import check_map_inputs
from pyro_backpass.inference.objective import (
    FrozenPrior,
    category_term,
    finite_sum,
    freeze_priors,
    joint_total,
    level_terms,
    object_mask,
    prior_grid,
)
from pyro_backpass.model.observation import ClosedFormConstants
from pyro_backpass.model.priors import SitePrior
from pyro_backpass.model.top_down import (
    TopDownStep,
    interleave_phases,
    phase_windows,
    shift_all,
)
from pyro_backpass.results import MapResult, ranked_modes

if TYPE_CHECKING:
    from pyro_backpass.model.generative_model import GenerativeModel

__all__ = ["DESCENT_ELEMENTS", "apply_clamps", "greedy_map"]

DESCENT_ELEMENTS = 2**20  # top_k > 1: one level's (rows × D × C·H·W) per group of completions


def apply_clamps(
    scores: torch.Tensor, grid: list[str], clamps: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Set hypotheses that disagree with a clamp to −inf. ``scores``: ``(B, *grid sizes)``."""
    for axis, site in enumerate(grid, start=1):
        if site in clamps:
            shape = [1] * scores.dim()
            shape[0], shape[axis] = -1, scores.shape[axis]
            values = torch.arange(scores.shape[axis], device=scores.device).reshape(shape)
            allowed = values == clamps[site].reshape([-1] + [1] * (scores.dim() - 1))
            scores = scores.masked_fill(~allowed, -torch.inf)
    return scores


def top_level_scores(
    gm: GenerativeModel,
    bu: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    priors: Mapping[str, FrozenPrior],
    *,
    batch: int,
    chunk_elements: int,
    constants: ClosedFormConstants,
    categories: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scores of all (category, γ, δ) of the top level: ``(B, N, K, D)``.

    ``categories``: sorted distinct category indices ``(N',)`` that may be chosen (a clamp); the
    templates of the others are not scored, and their hypotheses score −inf (as a clamp would
    set them). Also returns the templates shifted by every offset ``(N*K, D, C, H, W)`` when they
    were at hand (small enough to keep), else None.
    """
    top = gm.hidden_levels[-1]
    step = gm.steps[top]
    ncat, k, d = len(gm.categories), step.num_components, step.num_offsets
    planes = shifted = None
    if 3 * ncat * k * d * step.out.numel <= chunk_elements:
        shifted, planes = step.derived(
            "greedy_template_planes", (constants,), lambda: _template_planes(step, constants)
        )
    # The templates (N*K of them, shared by all images); with ``planes`` only their shape is read.
    templates = (step.weight if planes is not None else F.relu(step.weight)).reshape(
        1, ncat * k, *step.out.shape
    )  # (1, N*K, C, H, W)
    rows = None  # template rows (category-major) to score; None: all of them
    if categories is not None and categories.numel() < ncat:
        rows = (categories[:, None] * k + torch.arange(k, device=categories.device)).reshape(-1)
        templates = templates.index_select(1, rows)  # (1, N'*K, C, H, W)
        planes = None if planes is None else planes.index_select(1, rows)  # (3, N'*K, D, J)
    scores = hypothesis_scores(
        constants, bu.get(top), templates, step.offsets, observed=masks.get(top),
        chunk_elements=chunk_elements, planes=planes,
    )  # (B|1, N'*K, D)  # fmt: skip
    if rows is not None:
        full = scores.new_full((scores.shape[0], ncat * k, d), -torch.inf)
        scores = full.index_copy_(1, rows, scores)
    scores = scores.expand(batch, -1, -1).reshape(batch, ncat, k, d)
    grid, sizes = ["category", f"gamma_{top}", f"delta_{top}"], gm.site_sizes
    for site in grid:
        scores = scores + prior_grid(
            priors[site], site, fixed={}, grid=grid, sizes=sizes, batch=batch
        )
    if "category" in bu:
        cats = torch.arange(ncat, device=gm.device)[:, None]  # (N, 1)
        scores = scores + category_term(gm, cats, bu, masks).T[:, :, None, None]
    return scores, shifted


def _template_planes(
    step: TopDownStep, constants: ClosedFormConstants
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top level's templates shifted by every offset ``(N*K, D, C, H, W)`` and their
    :func:`~pyro_backpass.inference.hypotheses.template_planes` (kept by the step between calls
    while its templates, offsets and these constants stay the same)."""
    templates = F.relu(step.weight.detach()).reshape(-1, *step.out.shape)  # (N*K, C, H, W)
    return shift_all(templates, step.offsets), template_planes(constants, templates, step.offsets)


def level_scores(
    gm: GenerativeModel,
    name: str,
    upper: torch.Tensor,
    bu: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    *,
    chunk_elements: int,
    constants: ClosedFormConstants,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Data scores of all (γ, δ) of a level below the top, given F̂ above: ``(B, K, D)``.

    Also returns φ of all K components ``(B, K, C, H, W)`` when they fit in one chunk (else
    None), so the winner's φ need not be convolved again.
    """
    step = gm.steps[name]
    b, k, d = upper.shape[0], step.num_components, step.num_offsets
    chunk = max(1, chunk_elements // (b * d * step.out.numel))
    if step.by_phases and step.offset_list == ((0, 0),) and chunk >= k:
        return _phase_scores(step, upper, bu.get(name), masks.get(name), constants=constants,
                             chunk_elements=chunk_elements)  # fmt: skip
    parts = []
    for start in range(0, k, chunk):
        phi = step.phi_all(upper, slice(start, start + chunk))  # (B, n, C, H, W)
        parts.append(
            hypothesis_scores(
                constants, bu.get(name), phi, step.offsets, observed=masks.get(name),
                chunk_elements=chunk_elements,
            )  # (B, n, D)
        )  # fmt: skip
    return torch.cat(parts, dim=1), (phi if chunk >= k else None)


def _phase_scores(
    step: TopDownStep,
    upper: torch.Tensor,
    bu: torch.Tensor | None,
    mask: torch.Tensor | None,
    *,
    constants: ClosedFormConstants,
    chunk_elements: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`level_scores` of an unpool level with the one offset (0, 0), scored phase by
    phase against the matching quarter of the image, so φ of all K is never interleaved: its
    score is a sum over elements, whatever their order. Returns ``(B, K, 1)`` and the phase maps
    ``(B, 2, 2, K, C, H_in + 1, W_in + 1)`` (the winner's φ: :func:`winner_phi`)."""
    z = step.phi_phases(upper)
    size = step.out.shape[1:]
    if bu is not None and mask is not None:
        mask = torch.broadcast_to(mask, bu.shape)  # (B, C, H, W): slices by phase below
    scores = None
    for a, b, rows, cols in phase_windows(size):
        part = hypothesis_scores(
            constants, None if bu is None else bu[..., a::2, b::2], z[:, a, b, ..., rows, cols],
            step.offsets, observed=None if mask is None else mask[..., a::2, b::2],
            chunk_elements=chunk_elements,
        )  # (B, K, 1)  # fmt: skip
        scores = part if scores is None else scores + part
    return scores, z


def winner_phi(step: TopDownStep, phi: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """The unshifted φ ``(B, C, H, W)`` of component ``gamma`` ``(B,)`` per image, from
    :func:`level_scores`' second result (φ of all K, or an unpool's phase maps)."""
    rows = torch.arange(phi.shape[0], device=phi.device)
    if phi.dim() == 5:  # (B, K, C, H, W)
        return phi[rows, gamma]
    # (B, 2, 2, K, C, H_in+1, W_in+1): the winner's phases, interleaved as phi_all does.
    return interleave_phases(phi[rows, :, :, gamma], step.out.shape[1:])


def descend(
    gm: GenerativeModel,
    values: Mapping[str, torch.Tensor],
    *,
    bu: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    priors: Mapping[str, FrozenPrior],
    clamps: Mapping[str, torch.Tensor],
    chunk_elements: int,
    constants: Mapping[str, ClosedFormConstants],
    top_shifted: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Complete a top-level choice greedily down to the image.

    ``values`` holds ``category``, ``gamma_<top>``, ``delta_<top>`` as ``(B,)``. Returns the
    full assignment, F̂_td by level and the log-joint ``(B,)``. ``constants``: level → its
    closed-form constants; ``top_shifted``: the top level's templates shifted by every offset,
    from :func:`top_level_scores`, if it returned them.
    """
    top = gm.hidden_levels[-1]
    b = values["category"].shape[0]
    values = dict(values)
    td = {"category": gm.observation_td(values["category"])}
    step = gm.steps[top]
    if top_shifted is not None:
        # The winner's φ from the shifted templates of top_level_scores: the same values
        # level_terms would build (a ReLU, then a zero-filled shift), without building them.
        phi = top_shifted[values["category"] * step.num_components + values[f"gamma_{top}"],
                          values[f"delta_{top}"]]  # (B, C, H, W)  # fmt: skip
        upper, top_score = closed_form_with(
            constants[top], bu.get(top), phi, observed=masks.get(top)
        )
        top_score = finite_sum(top, top_score, bu.get(top))
    else:
        upper, top_score = level_terms(
            gm, top, values["category"], values[f"gamma_{top}"], values[f"delta_{top}"], bu,
            masks, constants=constants[top],
        )  # fmt: skip
    td[top], data_scores = upper, [top_score]
    sizes = gm.site_sizes
    for name in reversed(gm.hidden_levels[:-1]):
        grid = [f"gamma_{name}", f"delta_{name}"]
        step = gm.steps[name]
        # Every (γ, δ) scored by the blocked kernels of hypothesis_scores (one-offset levels
        # too: scores alone cost fewer passes than the full closed form of all K), then the
        # closed form of the winner alone, with log_joint's own code (level_terms below).
        scores, phi_all = level_scores(
            gm, name, upper, bu, masks, chunk_elements=chunk_elements,
            constants=constants[name],
        )  # fmt: skip
        d = sizes[f"delta_{name}"]
        # With one offset, log P(δ) is 0 for every hypothesis: it cannot change the choice.
        for site in grid if d > 1 else grid[:1]:
            scores = scores + prior_grid(
                priors[site], site, fixed=values, grid=grid, sizes=sizes, batch=b
            )
        scores = apply_clamps(scores, grid, clamps)
        best = scores.reshape(b, -1).argmax(dim=-1)  # first maximum: lowest flat index
        if d == 1:
            values[grid[0]], values[grid[1]] = best, torch.zeros_like(best)
        else:
            values[grid[0]], values[grid[1]] = best // d, best % d
        # F̂ and its score for the winner alone, with log_joint's own code, so greedy's
        # log_joint equals log_joint(assignment) exactly.
        upper, score = level_terms(
            gm, name, upper, values[grid[0]], values[grid[1]], bu, masks,
            phi=None if phi_all is None else winner_phi(step, phi_all, values[grid[0]]),
            constants=constants[name],
        )  # fmt: skip
        td[name] = upper
        data_scores.append(score)
    total = joint_total(gm, values, bu, masks, priors=priors, data_scores=data_scores)
    assignment = {site: values[site] for site in gm.sites}
    return assignment, td, total


def _repeat(x: torch.Tensor, k: int, b: int) -> torch.Tensor:
    if k == 1 or x.dim() == 0 or x.shape[0] != b:
        return x
    return x.repeat_interleave(k, dim=0)


def greedy_map(
    gm: GenerativeModel,
    bu: Mapping[str, torch.Tensor],
    *,
    category: Any = None,
    clamp: Mapping[str, Any] | None = None,
    priors: Mapping[str, SitePrior] | None = None,
    observed: Mapping[str, torch.Tensor] | None = None,
    top_k: int = 1,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> MapResult:
    """The guide-free backward pass: greedy layer-wise MAP of the hidden variables.

    :param gm: the generative model.
    :param bu: level name → ``(B, C, H, W)`` bottom-up activations (``image`` raw RGB in
        [0, 1]); levels absent are unobserved; canonical names of levels the model lacks
        (a backbone's levels above the model's top) are ignored, other names are an error.
    :param category: a name, an index or one per image; None enumerates it jointly with the
        top level's (γ, δ).
    :param clamp: site name → int or ``(B,)`` indices that the pass must take.
    :param priors: per-call prior overrides, site name → :class:`~pyro_backpass.SitePrior`
        (e.g. a location preference on ``delta_<top>``).
    :param observed: level → bool mask; False elements have no observation term (occlusion).
    :param top_k: with k > 1, the k best top-level hypotheses are each completed greedily
        down to the image; ``modes`` lists them by total log-joint and the best is returned
        as the MAP (the paper's Fig. 5 bars). That best can beat the plain pass, so compare
        greedy with :func:`~pyro_backpass.inference.exact` at ``top_k=1``.
    :param chunk_elements: bound on the elements of φ for one batch of hypotheses; peak memory
        is about ten times that many floats (or one level's hypotheses for B images, if more),
        whatever ``top_k``: the k completions are made a group at a time.
    :returns: :class:`~pyro_backpass.MapResult`.

    Example::

        gm = GenerativeModel.random([4, "M"], num_components=3, num_categories=2)
        s = sample(gm, 2, observe=True)
        result = greedy_map(gm, s.bu, top_k=5)
        result.assignment["category"], result.log_joint, result.modes[0][:2]
    """
    inputs = check_map_inputs(
        gm, bu, category=category, clamp=clamp, priors=priors, observed=observed, top_k=top_k
    )
    if (
        isinstance(chunk_elements, bool)
        or not isinstance(chunk_elements, int)
        or chunk_elements < 1
    ):
        raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
    # Inference mode (no autograd bookkeeping at all) is measurably faster than no_grad on
    # this op-heavy path; the result is cloned out of it so users can use it freely.
    with torch.inference_mode():
        result = _greedy(
            gm, bu=inputs.bu, masks=inputs.masks, clamps=inputs.clamps,
            priors=freeze_priors(inputs.priors), batch=inputs.batch, top_k=top_k,
            chunk_elements=chunk_elements,
        )  # fmt: skip
    return MapResult(
        assignment={s: v.clone() for s, v in result.assignment.items()},
        td={n: v.clone() for n, v in result.td.items()},
        log_joint=result.log_joint.clone(),
        mask=result.mask.clone(),
        modes=result.modes,
    )


def _greedy(
    gm: GenerativeModel,
    *,
    bu: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    clamps: Mapping[str, torch.Tensor],
    priors: Mapping[str, FrozenPrior],
    batch: int,
    top_k: int,
    chunk_elements: int,
) -> MapResult:
    """The body of :func:`greedy_map`, on validated inputs."""
    b = batch
    top = gm.hidden_levels[-1]
    grid = ["category", f"gamma_{top}", f"delta_{top}"]
    # Each level's closed-form constants, made once for the whole pass.
    consts = {name: gm.constants(name) for name in gm.hidden_levels}
    # A clamped category: only its templates are scored (the others' hypotheses are −inf).
    categories = torch.unique(clamps["category"]) if "category" in clamps else None
    scores, top_shifted = top_level_scores(
        gm, bu, masks, priors, batch=b, chunk_elements=chunk_elements, constants=consts[top],
        categories=categories,
    )  # fmt: skip
    flat = apply_clamps(scores, grid, clamps).reshape(b, -1)  # (B, N*K*D)
    if top_k > flat.shape[1]:
        raise ValueError(f"top_k={top_k} exceeds the {flat.shape[1]} top-level hypotheses")
    if top_k == 1:
        chosen = flat.argmax(dim=-1, keepdim=True)  # (B, 1), ties -> lowest index
    else:
        chosen = flat.sort(dim=-1, descending=True, stable=True).indices[:, :top_k]
    k = chosen.shape[1]
    _, kk, dd = scores.shape[1:]
    feasible_all = torch.isfinite(flat.gather(1, chosen))  # (B, k)
    # The k hypotheses of every image are completed in groups of ranks, so the descent holds
    # the rows of the plain pass (B), or as many as DESCENT_ELEMENTS of one level's scores
    # allow, never B·k: peak memory stays near that of top_k=1 (larger groups are not faster,
    # their tensors leave the cache); only assignments and totals, O(B·k), are kept for all.
    per_row = max(gm.steps[n].num_offsets * gm.steps[n].out.numel for n in gm.hidden_levels)
    budget = min(chunk_elements, DESCENT_ELEMENTS)
    ranks = max(1, max(b, budget // per_row) // b)  # ranks per group
    assignments, totals = [], []
    best_total = best_td = None
    for r0 in range(0, k, ranks):
        r1 = min(k, r0 + ranks)
        n = r1 - r0
        idx = chosen[:, r0:r1].reshape(-1)  # (B*n,), row i*n + j: image i, rank r0 + j
        top_values = {grid[0]: idx // (kk * dd), grid[1]: (idx // dd) % kk, grid[2]: idx % dd}
        rep_bu = {name: _repeat(x, n, b) for name, x in bu.items()}
        rep_masks = {name: _repeat(m.expand(bu[name].shape), n, b) for name, m in masks.items()}
        rep_clamps = {s: _repeat(v, n, b) for s, v in clamps.items()}
        assignment, td, total = descend(
            gm, top_values, bu=rep_bu, masks=rep_masks, priors=priors, clamps=rep_clamps,
            chunk_elements=chunk_elements, constants=consts, top_shifted=top_shifted,
        )  # fmt: skip
        total = torch.where(feasible_all[:, r0:r1], total.reshape(b, n), -torch.inf)  # (B, n)
        if k == 1:
            return MapResult(assignment=assignment, td=td, log_joint=total[:, 0],
                             mask=object_mask(gm, td, rep_bu, rep_masks), modes=None)  # fmt: skip
        assignments.append({s: v.reshape(b, n) for s, v in assignment.items()})
        totals.append(total)
        # The best of this group per image (first maximum: lowest rank), kept if it beats the
        # best of the earlier groups strictly (ties: the lower rank, as a stable sort gives).
        j = total.argmax(dim=1)  # (B,)
        group_best = total.gather(1, j[:, None]).squeeze(1)
        pick = torch.arange(b, device=gm.device) * n + j
        group_td = {name: v[pick] for name, v in td.items()}
        if best_total is None:
            best_total, best_td, best_rank = group_best, group_td, j + r0
        else:
            better = group_best > best_total
            best_total = torch.where(better, group_best, best_total)
            best_rank = torch.where(better, j + r0, best_rank)
            best_td = {
                name: torch.where(better.reshape(-1, *[1] * (v.dim() - 1)), group_td[name], v)
                for name, v in best_td.items()
            }
    total = torch.cat(totals, dim=1)  # (B, k)
    per_image = {s: torch.cat([a[s] for a in assignments], dim=1) for s in assignments[0]}
    # A clamped-out or impossible hypothesis has -inf at the top: keep only real ones.
    order = total.sort(dim=-1, descending=True, stable=True).indices  # (B, k)
    rows = torch.arange(b, device=gm.device)
    return MapResult(
        assignment={s: v[rows, best_rank] for s, v in per_image.items()},
        td=best_td,
        log_joint=best_total,
        mask=object_mask(gm, best_td, bu, masks),
        modes=ranked_modes(per_image, total, order),
    )
