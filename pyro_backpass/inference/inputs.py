"""The inputs of one MAP call (greedy or exact), checked once: clear errors at the boundary."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pyro_backpass.model.checks import check_bu, check_observed, merge_category
from pyro_backpass.model.priors import SitePrior

if TYPE_CHECKING:
    from pyro_backpass.model.generative_model import GenerativeModel

__all__ = ["MapInputs", "check_map_inputs"]


@dataclass(frozen=True)
class MapInputs:
    """What :func:`~pyro_backpass.greedy_map` and :func:`~pyro_backpass.exact_map` work on."""

    bu: dict[str, torch.Tensor]  # level → (B, C, H, W), the model's levels only, its dtype
    masks: dict[str, torch.Tensor]  # level → bool, broadcastable to bu[level]
    clamps: dict[str, torch.Tensor]  # site → (B,) long; ``category=`` folded in
    priors: dict[str, SitePrior]  # every site's prior, per-call overrides applied
    batch: int  # B


def check_map_inputs(
    gm: GenerativeModel,
    bu: Mapping[str, torch.Tensor],
    *,
    category: Any,
    clamp: Mapping[str, Any] | None,
    priors: Mapping[str, SitePrior] | None,
    observed: Mapping[str, torch.Tensor] | None,
    top_k: int,
) -> MapInputs:
    """Check the arguments shared by the MAP verbs (one signature, one check)."""
    checked, b = check_bu(gm, bu)
    masks = check_observed(gm, observed, checked, b)
    clamps = merge_category(gm, category, clamp, b)
    resolved = gm.resolve_priors(priors)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    return MapInputs(bu=checked, masks=masks, clamps=clamps, priors=resolved, batch=b)
