"""Potts grid MAP (lever 5's solver) against brute-force enumeration of every labelling."""

from __future__ import annotations

import itertools

import pytest
import torch

from pyro_backpass.inference import potts_energy, potts_grid_map


def _all_labellings(h: int, w: int, k: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(k), repeat=h * w))).reshape(-1, h, w)


def _brute_energy(unary: torch.Tensor, labels: torch.Tensor, coupling: float) -> torch.Tensor:
    """E(x) written out element by element, independently of potts_energy."""
    h, w = labels.shape
    total = sum(float(unary[i, j, labels[i, j]]) for i in range(h) for j in range(w))
    pairs = [((i, j), (i + 1, j)) for i in range(h - 1) for j in range(w)]
    pairs += [((i, j), (i, j + 1)) for i in range(h) for j in range(w - 1)]
    return total + coupling * sum(int(labels[a] == labels[b]) for a, b in pairs)


def _exact(unary: torch.Tensor, coupling: float) -> torch.Tensor:
    """The exact optimum of each map by enumerating all K^(H·W) labellings: ``(B,)``."""
    b, h, w, k = unary.shape
    every = _all_labellings(h, w, k)
    return torch.stack(
        [potts_energy(u[None].expand(len(every), -1, -1, -1), every, coupling).max() for u in unary]
    )


def test_energy_matches_its_definition():
    torch.manual_seed(1)
    unary = torch.randn(3, 3, 4, 3, dtype=torch.float64)
    labels = torch.randint(0, 3, (3, 3, 4))
    energy = potts_energy(unary, labels, 0.7)
    for i in range(3):
        assert float(energy[i]) == pytest.approx(_brute_energy(unary[i], labels[i], 0.7))


@pytest.mark.parametrize(("h", "w", "k"), [(4, 4, 2), (3, 3, 3)])
@pytest.mark.parametrize("coupling", [0.2, 0.6, 1.5])
def test_within_one_percent_of_the_exact_optimum(h, w, k, coupling):
    torch.manual_seed(h * 100 + k * 10 + int(coupling * 10))
    unary = torch.randn(8, h, w, k, dtype=torch.float64)
    labels, energy = potts_grid_map(unary, coupling=coupling)
    exact = _exact(unary, coupling)
    assert torch.allclose(potts_energy(unary, labels, coupling), energy)
    assert bool((energy <= exact + 1e-9).all())  # no labelling beats the exact optimum
    assert bool(((exact - energy) <= 0.01 * exact.abs()).all()), (exact - energy).max()


def test_no_coupling_is_each_locations_best_label():
    unary = torch.randn(2, 5, 6, 4)
    labels, _ = potts_grid_map(unary, coupling=0.0)
    assert torch.equal(labels, unary.argmax(-1))


def test_strong_coupling_is_the_best_single_label():
    torch.manual_seed(3)
    unary = torch.randn(4, 5, 5, 3, dtype=torch.float64)
    labels, energy = potts_grid_map(unary, coupling=1e3)
    best = unary.sum(dim=(1, 2)).argmax(-1)  # one label everywhere: the paper's one γ
    assert torch.equal(labels, best[:, None, None].expand(-1, 5, 5))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"\(B, H, W, K\)"):
        potts_grid_map(torch.zeros(4, 4, 2), coupling=1.0)
    with pytest.raises(ValueError, match="NaN"):
        potts_grid_map(torch.full((1, 2, 2, 2), float("nan")), coupling=1.0)
    with pytest.raises(ValueError, match="coupling"):
        potts_grid_map(torch.zeros(1, 2, 2, 2), coupling=-1.0)
    with pytest.raises(ValueError, match="finite unary"):
        potts_grid_map(torch.full((1, 2, 2, 2), -float("inf")), coupling=1.0)
