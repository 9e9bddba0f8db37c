"""A posterior-predictive check of the fitted observation model, as ArviZ data.

For every object of some scenes, F_td (the object alone, masked) is fixed and F_bu is drawn
from the fitted P(F_bu | F_td) of each level; per-level statistics of the draws are compared
with the same statistics of the real scene activations (``az.plot_ppc``):

* ``<level>_frac_above``: the fraction of the object's elements with F_bu ≥ λ;
* ``<level>_mean_above``: the mean F_bu over those elements (0 where there are none).

A model whose draws cover the observed statistics describes the scenes' activations; one whose
draws sit apart from them misstates either branch of eq. (9).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pyro_backpass.backbone import Backbone
from pyro_backpass.data import Scene
from pyro_backpass.learning.observation_fit import scene_pairs
from pyro_backpass.model import GenerativeModel

__all__ = ["observation_ppc", "observation_statistics"]


def observation_statistics(
    bu: torch.Tensor, used: torch.Tensor, threshold: float
) -> dict[str, torch.Tensor]:
    """``frac_above`` and ``mean_above`` per object of ``bu`` ``(..., O, C, h, w)``."""
    used = used.expand(bu.shape)
    above = (bu >= threshold) & used
    n_above = above.sum(dim=(-3, -2, -1)).double()
    frac = n_above / used.sum(dim=(-3, -2, -1)).clamp_min(1).double()
    mean = (bu.double() * above).sum(dim=(-3, -2, -1)) / n_above.clamp_min(1)
    return {"frac_above": frac, "mean_above": mean}


@torch.no_grad()
def observation_ppc(
    gm: GenerativeModel,
    backbone: Backbone,
    scenes: Sequence[Scene],
    *,
    levels: Sequence[str] | None = None,
    draws: int = 100,
    seed: int = 0,
):
    """An ``arviz.InferenceData`` with ``posterior_predictive`` (1 chain × ``draws``) and
    ``observed_data`` of the statistics above, one variable per level and statistic, over the
    objects of ``scenes`` (dimension ``object``)."""
    import arviz as az  # imported here: the installed ArviZ warns about its 1.x on import

    names = list(gm.hidden_levels if levels is None else levels)
    bu, td, used = scene_pairs(backbone, list(scenes))
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    predictive, observed = {}, {}
    try:
        for name in names:
            obs = gm.observations[name]
            lam = float(obs.threshold)
            real = observation_statistics(bu[name], used[name], lam)
            rep = obs.distribution(td[name]).sample((draws,))  # (S, O, C, h, w)
            fake = observation_statistics(rep, used[name], lam)
            for stat in real:
                observed[f"{name}_{stat}"] = real[stat].numpy()
                predictive[f"{name}_{stat}"] = fake[stat].numpy()[None]  # (1, S, O)
    finally:
        torch.random.set_rng_state(gen_state)
    dims = {key: ["object"] for key in observed}
    coords = {"object": np.arange(next(iter(observed.values())).shape[0])}
    return az.from_dict(
        posterior_predictive=predictive, observed_data=observed, dims=dims, coords=coords
    )
