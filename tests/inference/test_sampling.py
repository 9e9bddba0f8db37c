import pytest
import torch

from pyro_backpass import GenerativeModel, sample
from tests.oracles import phi_loop


def test_shapes_and_keys():
    gm = GenerativeModel.random([3, "M"], num_components=3, num_categories=2, image_size=8)
    s = sample(gm, 4, observe=True, seed=0)
    assert set(s.assignment) == set(gm.sites)
    assert all(v.shape == (4,) and v.dtype == torch.long for v in s.assignment.values())
    assert s.td["image"].shape == (4, 3, 8, 8) and s.td["pool1"].shape == (4, 3, 4, 4)
    assert s.td["category"].shape == (4, 2, 1, 1)
    assert set(s.bu) == set(gm.hidden_levels) and s.bu["conv1_1"].shape == (4, 3, 8, 8)
    assert sample(gm, 2).bu is None


def test_clamps_fix_sites_and_the_rest_varies():
    gm = GenerativeModel.random([3, "M"], num_components=3, num_categories=2, image_size=8)
    s = sample(gm, 64, category="c1", clamp={"gamma_pool1": 2, "delta_pool1": 4}, seed=1)
    assert (s.assignment["category"] == 1).all()
    assert (s.assignment["gamma_pool1"] == 2).all() and (s.assignment["delta_pool1"] == 4).all()
    assert len(set(s.assignment["gamma_conv1_1"].tolist())) > 1
    assert len(set(s.assignment["gamma_image"].tolist())) > 1
    assert s.td["image"].std(0).mean() > 0


def test_seeds_reproduce():
    gm = GenerativeModel.random([3, "M"], num_components=3, num_categories=2, image_size=8)
    a, b = sample(gm, 5, observe=True, seed=7), sample(gm, 5, observe=True, seed=7)
    c = sample(gm, 5, observe=True, seed=8)
    assert all(torch.equal(a.td[k], b.td[k]) for k in a.td)
    assert all(torch.equal(a.bu[k], b.bu[k]) for k in a.bu)
    assert not torch.equal(a.td["image"], c.td["image"])


def test_td_is_phi_plus_gaussian_noise():
    """Each level's sample minus an independently computed φ is N(0, σ0²) noise."""
    gm = GenerativeModel.random([3, "M"], num_components=3, num_categories=1, image_size=8)
    s = sample(gm, 40, seed=3)
    for j, name in enumerate(gm.hidden_levels):
        step = gm.steps[name]
        upper_name = gm.levels[j + 1].name
        resid = []
        for i in range(40):
            upper = s.assignment["category"][i] if upper_name == "category" else s.td[upper_name][i]
            with torch.no_grad():
                phi = phi_loop(
                    step, upper, int(s.assignment[f"gamma_{name}"][i]),
                    int(s.assignment[f"delta_{name}"][i]),
                )  # fmt: skip
            resid.append((s.td[name][i] - phi) / step.scale_td)
        z = torch.stack(resid)
        assert z.mean().abs() < 0.05 and (z.std() - 1).abs() < 0.05, name


def test_noise_zero_is_the_mean_path_and_noise_scales_the_spread():
    from pyro_backpass import GenerativeModel, sample

    gm = GenerativeModel.random([3, "M"], num_components=2, num_categories=2, image_size=8)
    s = sample(gm, 6, seed=0, noise=0.0)
    top = gm.hidden_levels[-1]
    phi = gm.steps[top].phi(s.assignment["category"], s.assignment[f"gamma_{top}"],
                            s.assignment[f"delta_{top}"])  # fmt: skip
    torch.testing.assert_close(s.td[top], phi)
    below = gm.hidden_levels[-2]
    phi = gm.steps[below].phi(s.td[top], s.assignment[f"gamma_{below}"],
                              s.assignment[f"delta_{below}"])  # fmt: skip
    torch.testing.assert_close(s.td[below], phi)
    # The residual's spread follows the multiplier (same seed: the same standard normals).
    big = sample(gm, 6, seed=0, noise=3.0)
    one = sample(gm, 6, seed=0, noise=1.0)

    def resid(r):
        a = r.assignment
        return r.td[top] - gm.steps[top].phi(a["category"], a[f"gamma_{top}"], a[f"delta_{top}"])

    torch.testing.assert_close(resid(big), 3 * resid(one), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="noise"):
        sample(gm, 2, noise=-1.0)
