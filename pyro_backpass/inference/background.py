"""The all-background explanation of bottom-up activations: the reference of the scene
parser's stop criterion (a log-likelihood ratio against it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from pyro_backpass.inference.closed_form import closed_form_with
from pyro_backpass.model.checks import check_bu, check_observed

if TYPE_CHECKING:
    from pyro_backpass.model.generative_model import GenerativeModel

__all__ = ["background_log_likelihood"]


def background_log_likelihood(
    gm: GenerativeModel,
    bu: Mapping[str, torch.Tensor],
    *,
    observed: Mapping[str, torch.Tensor] | None = None,
    profile: bool = True,
) -> torch.Tensor:
    """The data part of the objective with no object at all, ``(B,)``::

        Σ_l Σ_i max_{f_i} [log P(f_bu,i | f_i) + log N(f_i; 0, σ0_l)]

    i.e. φ = 0 on every hidden level, each element maximised in closed form (eq. 13) exactly
    as :func:`~pyro_backpass.log_joint` maximises it around an object's φ, with the same
    ``observed`` masks. ``log_joint(hypothesis) − background_log_likelihood`` is therefore a
    log-likelihood ratio of "this object (with its priors)" against "nothing here" on the same
    elements; the scene parser stops when it falls below a threshold fitted on validation
    scenes. No discrete variable is involved, so no prior term enters.

    :param bu: level name → ``(B, C, H, W)`` (levels absent contribute nothing to either side
        of the ratio: both score them as unobserved).
    :param observed: level → bool mask, as in :func:`~pyro_backpass.greedy_map`.
    :param profile: True: each f maximised as above; False: f = 0 exactly, every observed
        element on the off branch, ``log N(f_bu; β, σ2) + log N(0; 0, σ0)`` (a stricter
        background that cannot switch elements on).
    """
    bu, b = check_bu(gm, bu)
    masks = check_observed(gm, observed, bu, b)
    total = None
    for name in gm.hidden_levels:
        if name not in bu:
            continue
        x, c = bu[name], gm.constants(name)
        if profile:
            _, score = closed_form_with(
                c, x, x.new_zeros(()).expand_as(x), observed=masks.get(name)
            )  # (B, C, H, W)
        else:
            score = c.const_off - c.half_prec_off * (x - c.background).square()
            if name in masks:
                score = torch.where(masks[name], score, score.new_tensor(c.log_norm_td))
        part = score.sum(dim=(-3, -2, -1))
        total = part if total is None else total + part
    if total is None:
        return torch.zeros(b, dtype=gm.dtype, device=gm.device)
    return total
