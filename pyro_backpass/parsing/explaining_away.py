"""Explaining away a found object on every level (paper §3.2: "subtract it from the bottom-up
feature maps on all layers of the hierarchy, not only in the image space")."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["EXPLAIN_AWAY", "explain_away"]

#: The ways of removing a found object from the bottom-up maps, measured against each other by
#: ``benchmarks/parse_threshold.py`` on validation scenes (the default is the winner there).
EXPLAIN_AWAY = ("subtract", "unobserve")


def explain_away(
    bu: Mapping[str, torch.Tensor],
    observed: Mapping[str, torch.Tensor],
    td: Mapping[str, torch.Tensor],
    thresholds: Mapping[str, float],
    *,
    how: str,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The bottom-up maps and observed masks with one object removed, every hidden level.

    :param bu: level → ``(B, C, H, W)`` current bottom-up activations.
    :param observed: level → ``(B, C|1, H, W)`` bool masks so far (missing: all observed).
    :param td: level → ``(B, C, H, W)`` the object's F̂_td (closed-form top-down activations).
    :param thresholds: level → λ (the observation model's on-threshold).
    :param how: ``"subtract"``: ``bu ← relu(bu − F̂_td)`` on the object's on-elements
        (F̂_td ≥ λ) — what the object explains is taken away, what it leaves stays;
        ``"unobserve"``: the object's on-elements are marked unobserved, so later hypotheses
        are neither rewarded nor penalised there.
    """
    if how not in EXPLAIN_AWAY:
        raise ValueError(f"how={how!r}; choose one of {EXPLAIN_AWAY}")
    new_bu, new_obs = dict(bu), dict(observed)
    for name, x in bu.items():
        if name not in td or name == "category":
            continue
        on = td[name] >= thresholds[name]  # (B, C, H, W)
        if how == "subtract":
            new_bu[name] = torch.where(on, (x - td[name]).clamp_min(0), x)
        else:
            prev = observed.get(name)
            keep = ~on if prev is None else prev & ~on
            new_obs[name] = keep
    return new_bu, new_obs
