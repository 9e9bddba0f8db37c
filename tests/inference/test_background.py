"""background_log_likelihood against an independent oracle: each element's maximum over f of
the thresholded-Gaussian log-density plus log N(f; 0, σ0), found on a fine grid (profile), and
the plain densities at f = 0 (off)."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal

from pyro_backpass import GenerativeModel, ThresholdedGaussian
from pyro_backpass.inference import background_log_likelihood


@pytest.fixture
def gm():
    return GenerativeModel.random([2, "M"], num_components=2, num_categories=2, image_size=4,
                                  seed=0).double()  # fmt: skip


def _oracle(gm, bu, observed, profile):
    total = torch.zeros(bu["image"].shape[0], dtype=torch.float64)
    grid = torch.linspace(-3, 6, 90001, dtype=torch.float64)  # f_td candidates, step 1e-4
    for name in gm.hidden_levels:
        obs = gm.observations[name]
        s0 = float(gm.steps[name].scale_td)
        x = bu[name]  # (B, C, H, W)
        if profile:
            f = grid.view(-1, 1, 1, 1, 1)
            tg = ThresholdedGaussian(f.expand(-1, *x.shape), threshold=obs.threshold.double(),
                                     background=obs.background.double(),
                                     scale_on=obs.scale_on.double(),
                                     scale_off=obs.scale_off.double())  # fmt: skip
            score = (tg.log_prob(x) + Normal(0.0, s0).log_prob(f)).amax(0)
        else:
            tg = ThresholdedGaussian(torch.zeros_like(x), threshold=obs.threshold.double(),
                                     background=obs.background.double(),
                                     scale_on=obs.scale_on.double(),
                                     scale_off=obs.scale_off.double())  # fmt: skip
            score = tg.log_prob(x) + Normal(0.0, s0).log_prob(torch.tensor(0.0))
        if name in observed:
            score = torch.where(observed[name], score, Normal(0.0, s0).log_prob(torch.tensor(0.0)))
        total += score.sum(dim=(-3, -2, -1))
    return total


@pytest.mark.parametrize("profile", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_background_matches_the_grid_oracle(gm, profile, masked):
    g = torch.Generator().manual_seed(1)
    bu = {s.name: torch.rand(2, s.channels, s.height, s.width, generator=g,
                             dtype=torch.float64) * 1.5 for s in gm.levels[:-1]}  # fmt: skip
    observed = {}
    if masked:
        observed = {"conv1_1": torch.rand(2, 1, 4, 4, generator=g) > 0.5}
    got = background_log_likelihood(gm, bu, observed=observed or None, profile=profile)
    want = _oracle(gm, bu, observed, profile)
    assert torch.allclose(got, want, atol=1e-3 * bu["image"].numel(), rtol=1e-6)


def test_no_levels_observed_gives_zero(gm):
    assert torch.equal(background_log_likelihood(gm, {}), torch.zeros(1, dtype=torch.float64))
