import numpy as np
import pytest
import torch
from scipy import stats

from pyro_backpass import ThresholdedGaussian


def _params(shape=(3, 4, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    td = torch.randn(shape, generator=g, dtype=torch.float64)
    scale_on = torch.rand(shape[0], 1, 1, generator=g, dtype=torch.float64) + 0.2
    return td, dict(threshold=0.3, background=-0.2, scale_on=scale_on, scale_off=0.7)


def test_log_prob_matches_scipy_both_branches():
    td, p = _params()
    td[0, 0, 0] = p["threshold"]  # exactly at the threshold: the on-branch
    x = torch.randn(td.shape, dtype=torch.float64)
    d = ThresholdedGaussian(td, **p)
    on = td.numpy() >= p["threshold"]
    sigma1 = np.broadcast_to(p["scale_on"].numpy(), td.shape)
    expect = np.where(
        on,
        stats.norm.logpdf(x.numpy(), td.numpy(), sigma1),
        stats.norm.logpdf(x.numpy(), p["background"], p["scale_off"]),
    )
    assert on.any() and (~on).any()
    np.testing.assert_allclose(d.log_prob(x).numpy(), expect, rtol=1e-10)


def test_shapes_broadcast_expand_and_to_event():
    td, p = _params((3, 4, 5))
    d = ThresholdedGaussian(td, **p)
    assert d.batch_shape == (3, 4, 5) and d.event_shape == ()
    e = d.expand((2, 3, 4, 5))
    assert e.batch_shape == (2, 3, 4, 5)
    assert e.sample().shape == (2, 3, 4, 5)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(e.log_prob(x)[1], d.log_prob(x[1]))
    ind = d.to_event(3)
    assert ind.batch_shape == () and ind.event_shape == (3, 4, 5)
    assert ind.log_prob(x).shape == (2,)
    torch.testing.assert_close(ind.log_prob(x), d.log_prob(x).sum((-3, -2, -1)))
    assert d.sample((7,)).shape == (7, 3, 4, 5)


def test_validation_errors():
    td, p = _params()
    with pytest.raises(ValueError, match="scale_on"):
        ThresholdedGaussian(td, **{**p, "scale_on": -1.0}, validate_args=True)
    d = ThresholdedGaussian(td, **p, validate_args=True)
    with pytest.raises(ValueError):
        d.log_prob(torch.full(td.shape, float("nan"), dtype=torch.float64))


@pytest.mark.parametrize("td_value, loc, scale", [(1.0, 1.0, 0.4), (0.1, -0.2, 0.7)])
def test_sampling_goodness_of_fit(td_value, loc, scale):
    """Kolmogorov–Smirnov against the branch's Gaussian (on: N(td, σ1), off: N(β, σ2))."""
    d = ThresholdedGaussian(
        torch.tensor(td_value), threshold=0.3, background=-0.2, scale_on=0.4, scale_off=0.7
    )
    torch.manual_seed(1)
    xs = d.sample((20000,)).numpy()
    assert stats.kstest(xs, stats.norm(loc, scale).cdf).pvalue > 1e-3
    # and the other branch's distribution is rejected
    other = (-0.2, 0.7) if loc == 1.0 else (0.1, 0.4)
    assert stats.kstest(xs, stats.norm(*other).cdf).pvalue < 1e-6
