import pytest
import torch

from pyro_backpass import CategoricalPrior, NGramPrior, UniformPrior


def test_map_estimate_is_the_dirichlet_posterior_mode():
    prior = NGramPrior(torch.ones(2, 3), parents=["category"], concentration=2.0)
    counts = torch.tensor([[3.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    # (n + α − 1) / Σ: row 0 = [4, 1, 2] / 7; row 1 = uniform.
    expect = torch.tensor([[4 / 7, 1 / 7, 2 / 7], [1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(prior.map_estimate(counts), expect)
    sparse = NGramPrior(torch.ones(1, 3), parents=["x"], concentration=0.5)
    torch.testing.assert_close(
        sparse.map_estimate(torch.tensor([[2.0, 0.0, 0.0]])), torch.tensor([[1.0, 0.0, 0.0]])
    )


def test_tables_are_normalised_and_errors_are_named():
    assert UniformPrior(4).log_probs().exp().sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(CategoricalPrior([1.0, 3.0]).probs, torch.tensor([0.25, 0.75]))
    with pytest.raises(ValueError, match="non-negative"):
        CategoricalPrior([1.0, -1.0])
    with pytest.raises(ValueError, match="positive entry"):
        CategoricalPrior([0.0, 0.0])
    with pytest.raises(ValueError, match="one leading dimension per parent"):
        NGramPrior(torch.ones(3), parents=["category"])
    with pytest.raises(ValueError, match="concentration"):
        NGramPrior(torch.ones(2, 2), parents=["category"], concentration=0.0)
    with pytest.raises(ValueError, match="counts shape"):
        NGramPrior(torch.ones(2, 2), parents=["c"]).map_estimate(torch.ones(3))
