"""Ancestral sampling (Sec. 2.2.2 of the paper) by running ``gm.model`` under a Pyro trace."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from pyro import poutine

from pyro_backpass.model.checks import merge_category
from pyro_backpass.model.priors import SitePrior
from pyro_backpass.results import Sample

if TYPE_CHECKING:
    from pyro_backpass.model.generative_model import GenerativeModel

__all__ = ["sample"]


def sample(
    gm: GenerativeModel,
    n: int,
    *,
    category: Any = None,
    clamp: Mapping[str, Any] | None = None,
    priors: Mapping[str, SitePrior] | None = None,
    observe: bool = False,
    seed: int | None = None,
    noise: float = 1.0,
) -> Sample:
    """Draw ``n`` ancestral samples: category, then per level γ, δ and F_td top-down.

    The samples are the values of ``gm.model``'s sites in one ``poutine.trace``; clamps (and
    ``category``) enter through ``poutine.condition``, so clamped sites are fixed and the rest
    vary. The paper's Fig. 4 is ``clamp={"gamma_pool5": g, "delta_pool5": d}``.

    :param n: the number of samples.
    :param category: a name, an index or one per sample.
    :param clamp: site name → int or ``(n,)`` indices.
    :param priors: per-call prior overrides.
    :param observe: also sample the bottom-up observations ``bu`` of every level.
    :param seed: seeds torch's generator for this call only (same seed, same samples).
    :param noise: multiplier of σ0 on the top-down path: 0 gives the mean path (each level
        exactly φ of the one above), 1 the model's own samples.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    data = merge_category(gm, category, clamp, n)
    conditioned = poutine.condition(gm.model, data=data)
    devices = [gm.device] if gm.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        trace = poutine.trace(conditioned).get_trace(
            batch_size=n, priors=priors, sample_bu=observe, noise=noise
        )
    nodes = trace.nodes
    assignment = {s: nodes[s]["value"].long() for s in gm.sites}
    td = {name: nodes[f"td_{name}"]["value"] for name in gm.hidden_levels}
    td["category"] = gm.observation_td(assignment["category"])
    bu = None
    if observe:
        bu = {name: nodes[f"bu_{name}"]["value"] for name in gm.hidden_levels}
    return Sample(td=td, assignment=assignment, bu=bu)
