import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from pyro_backpass import ThresholdedGaussian, closed_form_td


def _objective(f, bu, phi, lam, beta, s0, s1, s2):
    """log P(bu | f) + log N(f; phi, s0) on a grid, with scipy densities."""
    obs = np.where(f >= lam, stats.norm.logpdf(bu, f, s1), stats.norm.logpdf(bu, beta, s2))
    return obs + stats.norm.logpdf(f, phi, s0)


finite = st.floats(-3, 3, allow_nan=False)
scale = st.floats(0.05, 1.5)


@settings(max_examples=150, deadline=None)
@given(bu=finite, phi=finite, lam=finite, beta=finite, s0=scale, s1=scale, s2=scale)
def test_matches_dense_grid_search(bu, phi, lam, beta, s0, s1, s2):
    lo, hi = min(bu, phi, lam) - 8 * max(s0, s1), max(bu, phi, lam) + 8 * max(s0, s1)
    grid = np.concatenate([np.linspace(lo, hi, 400_001), [lam, np.nextafter(lam, -np.inf)]])
    values = _objective(grid, bu, phi, lam, beta, s0, s1, s2)
    best = values.max()
    f, score = closed_form_td(
        torch.tensor(bu, dtype=torch.float64),
        torch.tensor(phi, dtype=torch.float64),
        threshold=lam,
        background=beta,
        scale_td=s0,
        scale_on=s1,
        scale_off=s2,
    )
    # The closed form is the supremum: never below the grid, and not above it by more than the
    # grid's resolution can hide.
    assert score.item() >= best - 1e-6
    assert score.item() <= best + 1e-3 * (1 + 1 / s0**2 + 1 / s1**2)
    # ... and attained at the returned f (scored with the plain branch rule f >= λ).
    attained = _objective(np.array([f.item()]), bu, phi, lam, beta, s0, s1, s2)[0]
    assert attained == pytest.approx(score.item(), abs=1e-9)


def test_unobserved_elements_follow_phi():
    phi = torch.tensor([0.1, 0.9, 2.0])
    bu = torch.tensor([5.0, -3.0, 0.0])
    f, score = closed_form_td(
        bu, phi, threshold=0.5, background=0.0, scale_td=0.1, scale_on=0.3, scale_off=0.3,
        observed=torch.tensor([False, True, False]),
    )  # fmt: skip
    assert f[0] == phi[0] and f[2] == phi[2] and f[1] != phi[1]
    expect = stats.norm.logpdf(0.0, 0.0, 0.1)
    assert score[0].item() == pytest.approx(expect, rel=1e-6)
    f_none, s_none = closed_form_td(
        None, phi, threshold=0.5, background=0.0, scale_td=0.1, scale_on=0.3, scale_off=0.3
    )
    torch.testing.assert_close(f_none, phi)
    torch.testing.assert_close(s_none, torch.full((3,), expect, dtype=torch.float32))


def test_boundary_value_is_scored_on_the_branch_that_won():
    """φ above λ but the scene is background: the off-branch wins at the boundary.

    The plain ThresholdedGaussian at the returned f must give the off-branch density; at
    f = λ exactly it would give the on-branch one, a gap of many nats over a level.
    """
    phi = torch.full((100,), 0.8)
    bu = torch.full((100,), 0.0)
    kw = dict(threshold=0.5, background=0.0, scale_on=0.05, scale_off=0.05)
    f, score = closed_form_td(bu, phi, scale_td=1.0, **kw)
    assert (f < 0.5).all() and (f > 0.4999).all()
    model_lp = ThresholdedGaussian(f, **kw).log_prob(bu) + torch.distributions.Normal(
        phi, 1.0
    ).log_prob(f)
    torch.testing.assert_close(model_lp, score)
    naive = ThresholdedGaussian(torch.full_like(f, 0.5), **kw).log_prob(bu)
    assert (naive.sum() - ThresholdedGaussian(f, **kw).log_prob(bu).sum()).abs() > 1000


def test_observation_constants_give_the_closed_form_of_its_parameters():
    """``closed_form`` with an Observation's (cached) constants equals ``closed_form_td`` with
    its raw parameters, also after an in-place edit of a parameter."""
    from pyro_backpass.inference.closed_form import closed_form_with
    from pyro_backpass.levels import LevelSpec
    from pyro_backpass.model.observation import Observation

    g = torch.Generator().manual_seed(0)
    bu, phi = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    obs = Observation(LevelSpec("pool1", "pool", 3, 5, 5), threshold=0.2, background=0.1,
                      scale_on=torch.rand(3) + 0.1, scale_off=0.5)  # fmt: skip
    scale_td = torch.tensor(0.3)
    mask = torch.rand(4, 1, 5, 5, generator=g) > 0.5
    for edit in (None, 0.4):
        if edit is not None:
            obs.threshold.fill_(edit)
        kw = dict(threshold=obs.threshold, background=obs.background, scale_td=scale_td,
                  scale_on=obs.scale_on, scale_off=obs.scale_off)  # fmt: skip
        for observed in (None, mask, False):
            want = closed_form_td(bu, phi, observed=observed, **kw)
            got = closed_form_with(obs.constants(scale_td), bu, phi, observed=observed)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad", [{"threshold": float("inf")}, {"background": float("nan")}, {"scale_td": 0.0}]
)
def test_non_finite_or_non_positive_parameters_are_named(bad):
    kw = dict(threshold=0.5, background=0.0, scale_td=0.1, scale_on=0.3, scale_off=0.3) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        closed_form_td(torch.zeros(3), torch.zeros(3), **kw)
