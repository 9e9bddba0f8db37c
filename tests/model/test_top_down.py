import pytest
import torch

from pyro_backpass import GenerativeModel
from pyro_backpass.model.top_down import offset_grid, shift_all, shift_select
from tests.oracles import phi_loop, shift_loop


def test_offset_grid_is_row_major():
    assert offset_grid(1)[:4] == [(-1, -1), (-1, 0), (-1, 1), (0, -1)]
    assert len(offset_grid(2)) == 25 and offset_grid(0) == [(0, 0)]


def test_shifts_against_index_loop():
    x = torch.randn(2, 3, 5, 6)
    offsets = torch.tensor(offset_grid(2))
    allshift = shift_all(x, offsets)  # (2, 25, 3, 5, 6)
    delta = torch.tensor([3, 17])
    sel = shift_select(x, offsets, delta)
    for b in range(2):
        for d, (dy, dx) in enumerate(offsets.tolist()):
            torch.testing.assert_close(allshift[b, d], shift_loop(x[b], dy, dx))
        dy, dx = offsets[delta[b]].tolist()
        torch.testing.assert_close(sel[b], shift_loop(x[b], dy, dx))


@pytest.mark.parametrize(
    "offsets",
    [[(1, 0)], [(0, 2), (-1, 1), (2, -2)], [(dx, dy) for dy, dx in offset_grid(1)]],
    ids=["one-nonzero", "sparse", "column-major"],
)
def test_any_offset_list_against_index_loop(offsets):
    """Offsets that are not the full row-major grid take the indexed path: same result."""
    x = torch.randn(3, 2, 5, 4)
    offsets = torch.tensor(offsets)
    allshift = shift_all(x, offsets)
    out = torch.full_like(allshift, float("nan"))
    assert shift_all(x, offsets, out=out) is out
    delta = torch.arange(3) % len(offsets)
    sel = shift_select(x, offsets, delta)
    for b in range(3):
        for d, (dy, dx) in enumerate(offsets.tolist()):
            torch.testing.assert_close(allshift[b, d], shift_loop(x[b], dy, dx))
            torch.testing.assert_close(out[b, d], shift_loop(x[b], dy, dx))
        dy, dx = offsets[delta[b]].tolist()
        torch.testing.assert_close(sel[b], shift_loop(x[b], dy, dx))


@pytest.mark.parametrize("cfg, size", [([3, "M", 4], 8), ([2, 3, "M", 4, "M"], 10)])
def test_phi_against_per_hypothesis_loop(cfg, size):
    """Batched φ (one conv for all K, shifts as slices) equals a per-hypothesis loop."""
    gm = GenerativeModel.random(cfg, num_components=3, num_categories=2, image_size=size)
    torch.manual_seed(0)
    for name in gm.hidden_levels:
        step = gm.steps[name]
        if step.kind == "template":
            upper = torch.tensor([1, 0])
        else:
            upper = torch.randn(2, *step.upper.shape).relu()
        all_phi = shift_all(step.phi_all(upper), step.offsets)  # (2, K, D, C, H, W)
        gamma = torch.tensor([2, 1])
        delta = torch.tensor([step.num_offsets - 1, 0])
        sel = step.phi(upper, gamma, delta)
        for b in range(2):
            u = upper[b]
            for g in range(step.num_components):
                for d in range(step.num_offsets):
                    torch.testing.assert_close(
                        all_phi[b, g, d], phi_loop(step, u, g, d), atol=1e-5, rtol=1e-5
                    )
            expect = phi_loop(step, u, int(gamma[b]), int(delta[b]))
            torch.testing.assert_close(sel[b], expect, atol=1e-5, rtol=1e-5)


def test_phi_broadcasts_enumeration_dims():
    gm = GenerativeModel.random([3, "M"], num_components=4, num_categories=1, image_size=8)
    step = gm.steps["conv1_1"]
    upper = torch.randn(2, *step.upper.shape)  # (B, C, H, W)
    gamma = torch.arange(4).reshape(4, 1, 1)  # an enumeration dim at -3
    delta = torch.zeros(1, 1, 1, dtype=torch.long)
    out = step.phi(upper, gamma, delta)
    assert out.shape == (4, 1, 2, *step.out.shape)
    torch.testing.assert_close(out[2, 0, 1], phi_loop(step, upper[1], 2, 0), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "cfg, size", [([20, "M", 3], 10), ([20, "M", 3], 11), ([3, "M", 4], 9)],
    ids=["transposed-conv", "transposed-conv-odd", "phase-conv-odd"],
)  # fmt: skip
def test_unpool_both_forms_against_per_hypothesis_loop(cfg, size):
    """φ of an unpool step, by the transposed convolution (many input channels) or the phase
    convolution (few), odd output sizes included, equals a per-hypothesis transposed conv."""
    gm = GenerativeModel.random(cfg, num_components=3, num_categories=1, image_size=size)
    step = gm.steps["conv1_1"]
    assert step.kind == "unpool"
    upper = torch.randn(2, *step.upper.shape).relu()
    all_phi = step.phi_all(upper)  # (2, K, C, H, W)
    for b in range(2):
        for g in range(step.num_components):
            want = phi_loop(step, upper[b], g, 0)
            torch.testing.assert_close(all_phi[b, g], want, atol=1e-5, rtol=1e-5)
