"""The objective shared by greedy and exact MAP, and :func:`log_joint` to score any assignment.

For an assignment of all discrete sites, F̂_td is computed top-down, each level's F̂^l_td the
closed-form maximiser (eq. 13) given the levels above; the score is::

    log P(c) + log P(F^L_bu | c) + Σ_l [ log P(γ_l | parents) + log P(δ_l)
                                        + Σ_i log_score_i(F^l_bu, φ_l(F̂^{l+1}, γ_l, δ_l)) ]

which equals the Pyro model's log-density with ``td_<level>`` conditioned on F̂_td. The
Dirichlet density of the tables is not included (they are point estimates in ``model()``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from pyro_backpass.inference.closed_form import closed_form_with
from pyro_backpass.levels import full_resolution_level
from pyro_backpass.model.checks import check_bu, check_clamp, check_observed
from pyro_backpass.model.observation import ClosedFormConstants
from pyro_backpass.model.priors import SitePrior
from pyro_backpass.model.top_down import shift_select

if TYPE_CHECKING:
    from pyro_backpass.model.generative_model import GenerativeModel

__all__ = [
    "FrozenPrior",
    "NonFiniteScoreError",
    "category_term",
    "finite_sum",
    "freeze_priors",
    "full_res_level",
    "joint_total",
    "level_terms",
    "log_joint",
    "object_mask",
    "prior_grid",
    "site_log_prob",
    "top_down_pass",
]


class FrozenPrior:
    """A prior's ``log_probs()`` evaluated once, for the many lookups of one inference call."""

    __slots__ = ("parents", "_log_probs")

    def __init__(self, prior: SitePrior) -> None:
        self.parents = prior.parents
        self._log_probs = prior.log_probs()

    def log_probs(self) -> torch.Tensor:
        return self._log_probs


def freeze_priors(priors: Mapping[str, SitePrior]) -> dict[str, FrozenPrior]:
    """:class:`FrozenPrior` of every site (the tables do not change during one call)."""
    return {site: FrozenPrior(prior) for site, prior in priors.items()}


def prior_grid(
    prior: SitePrior | FrozenPrior,
    site: str,
    *,
    fixed: Mapping[str, torch.Tensor],
    grid: Sequence[str],
    sizes: Mapping[str, int],
    batch: int,
) -> torch.Tensor:
    """``log P(site | parents)`` over a grid of jointly enumerated sites.

    ``fixed``: already assigned sites → ``(B,)``; ``grid``: the enumerated sites (``site`` among
    them). Returns ``(B, *[sizes[g] for g in grid])``.
    """
    lp = prior.log_probs()
    ndim = 1 + len(grid)
    for parent in prior.parents:
        if parent not in grid and parent not in fixed:
            raise ValueError(f"prior of {site!r} needs {parent!r}, which is not assigned yet")
    if not any(parent in grid for parent in prior.parents):
        # Every parent assigned already: one lookup gives (B, S) (or (S,) without parents).
        if prior.parents:
            lp = lp[tuple(fixed[parent] for parent in prior.parents)]
        shape = [lp.shape[0] if lp.dim() == 2 else 1] + [1] * len(grid)
        shape[1 + grid.index(site)] = sizes[site]
        return lp.reshape(shape).expand([batch] + [sizes[g] for g in grid])

    def axis_index(name: str) -> torch.Tensor:
        shape = [1] * ndim
        shape[1 + grid.index(name)] = sizes[name]
        return torch.arange(sizes[name], device=lp.device).reshape(shape)

    index = []
    for parent in prior.parents:
        if parent in grid:
            index.append(axis_index(parent))
        else:
            index.append(fixed[parent].reshape([batch] + [1] * len(grid)))
    index.append(axis_index(site))
    out = lp[tuple(index)]
    return out.expand([batch] + [sizes[g] for g in grid])


def full_res_level(gm: GenerativeModel) -> str:
    """The level whose on-elements define an object's mask (see :class:`MapResult`)."""
    return full_resolution_level(gm.levels)


def object_mask(
    gm: GenerativeModel,
    td: Mapping[str, torch.Tensor],
    bu: Mapping[str, torch.Tensor] | None = None,
    observed: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(B, H, W)`` bool: the model's learned readout of F̂ if it has one
    (:class:`~pyro_backpass.model.MaskReadout`; one that ``reads_input`` also reads ``bu``, the
    input's activations the pass explained, F̂ where ``observed`` is False), else the elements
    of F̂_td at :func:`full_res_level` at or above that level's ``mask_threshold`` (λ unless
    tuned), any channel."""
    readout = getattr(gm, "mask_readout", None)
    if readout is not None:
        return readout(td, bu, observed)
    name = full_res_level(gm)
    return td[name].amax(dim=-3) >= gm.observations[name].mask_threshold  # some channel is on


class NonFiniteScoreError(ValueError):
    """A term of the objective is NaN or infinite for finite inputs (an overflow)."""


def finite_sum(name: str, score: torch.Tensor, bu: torch.Tensor | None) -> torch.Tensor:
    """``score`` ``(..., C, H, W)`` summed over the level's elements, or a ``ValueError`` naming
    the level and how many elements are not finite.

    Every term of the objective is finite for finite inputs and parameters unless a value
    overflows the dtype (e.g. bottom-up activations of 1e30 square to inf): that must be an
    error, not a −inf log-joint with an arbitrary assignment.
    """
    total = score.sum(dim=(-3, -2, -1))
    if bool(torch.isfinite(total).all()):
        return total
    bad = ~torch.isfinite(score)
    detail = ""
    if bu is not None:
        detail = (
            f"; bu[{name!r}] spans [{bu.min().item():.3g}, {bu.max().item():.3g}], too large "
            f"for the model's {str(score.dtype).removeprefix('torch.')} arithmetic — rescale it"
        )
    raise NonFiniteScoreError(
        f"level {name!r}: the backward pass's score is not finite on {int(bad.sum()):,} of "
        f"{score.numel():,} elements{detail}"
    )


def level_terms(
    gm: GenerativeModel,
    name: str,
    upper: torch.Tensor,
    gamma: torch.Tensor,
    delta: torch.Tensor,
    bu: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    *,
    phi: torch.Tensor | None = None,
    constants: ClosedFormConstants | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """F̂^l_td ``(B, C, H, W)`` and the level's data score ``(B,)`` for given (γ, δ).

    ``phi``: the unshifted φ of ``gamma`` ``(B, C, H, W)`` if the caller has it already (the
    values ``step.phi_all(upper)`` gives; no new conv); ``constants``: the level's closed-form
    constants, if made already.
    """
    step = gm.steps[name]
    if phi is None:
        phi = step.phi(upper, gamma, delta)  # (B, C, H, W)
    else:
        phi = shift_select(phi, step.offsets, delta)
    c = gm.constants(name) if constants is None else constants
    f_td, score = closed_form_with(c, bu.get(name), phi, observed=masks.get(name))
    return f_td, finite_sum(name, score, bu.get(name))


def category_term(
    gm: GenerativeModel, category: torch.Tensor, bu: Mapping[str, torch.Tensor], masks
) -> torch.Tensor:
    """``log P(F^L_bu | c)``; 0 without ``bu['category']``.

    ``category``: indices whose last dim broadcasts with the batch (``(B,)``, ``(N, 1)``, or
    Pyro's enumeration shapes); the result has the broadcast shape.
    """
    if "category" not in bu:
        return torch.zeros(category.shape, dtype=gm.dtype, device=gm.device)
    d = gm.observations["category"].distribution(gm.observation_td(category))
    lp = d.log_prob(bu["category"])  # (..., B, N, 1, 1)
    if "category" in masks:
        lp = lp * masks["category"]
    return finite_sum("category", lp, bu["category"])


def log_joint(
    gm: GenerativeModel,
    bu: Mapping[str, torch.Tensor],
    assignment: Mapping[str, Any],
    *,
    observed: Mapping[str, torch.Tensor] | None = None,
    priors: Mapping[str, SitePrior] | None = None,
) -> torch.Tensor:
    """The objective of greedy and exact MAP at any full assignment, ``(B,)``.

    :param assignment: every discrete site (``gm.sites``) → an int or ``(B,)`` indices, as in
        :attr:`MapResult.assignment`.
    """
    bu, b = check_bu(gm, bu)
    masks = check_observed(gm, observed, bu, b)
    missing = [s for s in gm.sites if s not in assignment]
    if missing:
        raise ValueError(f"assignment is missing sites {missing}")
    values = check_clamp(gm, {s: assignment[s] for s in gm.sites}, b)
    priors = gm.resolve_priors(priors)
    _, data_scores = top_down_pass(gm, values, bu, masks)
    return joint_total(gm, values, bu, masks, priors=priors, data_scores=data_scores)


def joint_total(
    gm: GenerativeModel,
    values: Mapping[str, torch.Tensor],
    bu: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    *,
    priors: Mapping[str, SitePrior | FrozenPrior],
    data_scores: Sequence[torch.Tensor],
) -> torch.Tensor:
    """The log-joint ``(B,)`` from each level's data score, always summed in the same order
    (category term, every site's prior, then the levels top-down), so greedy's total and
    :func:`log_joint` of its assignment agree to the last bit."""
    total = category_term(gm, values["category"], bu, masks)
    for site in gm.sites:
        total = total + site_log_prob(priors[site], site, values)
    for score in data_scores:
        total = total + score
    return total


def top_down_pass(
    gm: GenerativeModel,
    values: Mapping[str, torch.Tensor],
    bu: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """F̂_td of a full assignment, level by level, and each level's data score ``(B,)``."""
    td = {"category": gm.observation_td(values["category"])}
    upper, scores = values["category"], []
    for name in reversed(gm.hidden_levels):
        upper, score = level_terms(
            gm, name, upper, values[f"gamma_{name}"], values[f"delta_{name}"], bu, masks
        )
        td[name] = upper
        scores.append(score)
    return td, scores


def site_log_prob(
    prior: SitePrior | FrozenPrior, site: str, values: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """``log P(site | parents)`` at a full assignment ``values`` (site → ``(B,)``)."""
    lp = prior.log_probs()
    return lp[tuple(values[p] for p in prior.parents) + (values[site],)]
