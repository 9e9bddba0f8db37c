"""Observation-model fit against scipy's normal densities and brute-force loops."""

import math

import pytest
import torch
from scipy import stats

from pyro_backpass.learning.observation_fit import fit_level
from pyro_backpass.learning.targets import max_pool_mask


def test_max_pool_mask_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 13, 17, generator=g) > 0.8
    got = max_pool_mask(mask, (4, 5))
    fh, fw = 13 // 4, 17 // 5
    for b in range(3):
        for i in range(4):
            for j in range(5):
                want = bool(mask[b, i * fh : (i + 1) * fh, j * fw : (j + 1) * fw].any())
                assert bool(got[b, i, j]) == want


def test_max_pool_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="bool"):
        max_pool_mask(torch.zeros(2, 4, 4), (2, 2))
    with pytest.raises(ValueError, match="cannot pool"):
        max_pool_mask(torch.zeros(2, 4, 4, dtype=torch.bool), (8, 8))


def _synthetic(seed=0, n=400, c=3, lam=0.5, beta=0.2, s1=(0.1, 0.2, 0.4), s2=0.3):
    g = torch.Generator().manual_seed(seed)
    td = torch.relu(torch.randn(n, c, 6, 6, generator=g))  # about half exactly 0
    on = td >= lam
    s1t = torch.tensor(s1).view(1, -1, 1, 1)
    bu = torch.where(
        on,
        td + s1t * torch.randn(td.shape, generator=g),
        beta + s2 * torch.randn(td.shape, generator=g),
    )
    return bu, td


def test_closed_form_parameters_recover_the_generating_ones():
    bu, td = _synthetic()
    fit = fit_level(bu, td, scale_td=0.05, threshold=0.5, constrain=False)
    assert fit.background == pytest.approx(0.2, abs=0.01)
    assert fit.scale_off == pytest.approx(0.3, rel=0.03)
    torch.testing.assert_close(fit.scale_on_free, torch.tensor([0.1, 0.2, 0.4]), rtol=0.05, atol=0)


def test_log_likelihood_grid_equals_scipy():
    bu, td = _synthetic(n=30)
    used = torch.rand(bu.shape, generator=torch.Generator().manual_seed(1)) > 0.2
    fit = fit_level(bu, td, used, scale_td=0.05, grid_size=7, constrain=False)
    b, t, u = bu.double().numpy(), td.double().numpy(), used.numpy()
    for lam, ll in zip(fit.grid.tolist(), fit.log_lik.tolist(), strict=True):
        lam = float(torch.tensor(lam, dtype=torch.float32))  # the grid is stored in float32
        on, off = u & (t >= lam), u & ~(t >= lam)
        if not off.any():
            assert ll == -math.inf
            continue
        beta, s2 = b[off].mean(), b[off].std()
        total = stats.norm.logpdf(b[off], beta, s2).sum()
        for ch in range(b.shape[1]):
            sel = on[:, ch]
            if sel.any():
                r = b[:, ch][sel] - t[:, ch][sel]
                total += stats.norm.logpdf(r, 0, math.sqrt((r**2).mean())).sum()
        assert ll == pytest.approx(total / u.sum(), rel=1e-4, abs=1e-4)
    assert fit.threshold_ml == fit.grid[int(fit.log_lik.argmax())]


def test_quantile_rule_and_constraint():
    bu, td = _synthetic(s1=(0.5, 0.6, 0.7), s2=0.3)
    fit = fit_level(bu, td, scale_td=0.1, quantile=0.25, factor=1.5)
    positive = td[td > 0].double()
    assert fit.threshold == pytest.approx(1.5 * float(torch.quantile(positive, 0.25)), rel=1e-6)
    cap = math.sqrt(fit.scale_off**2 - 0.1**2)
    assert (fit.scale_on <= cap + 1e-6).all()
    assert (fit.scale_on_free > cap).any()  # the constraint did something here
    free = fit_level(bu, td, scale_td=0.1, constrain=False)
    torch.testing.assert_close(free.scale_on, free.scale_on_free)


def test_bad_inputs_are_named():
    bu, td = _synthetic(n=4)
    with pytest.raises(ValueError, match="must both be"):
        fit_level(bu[:2], td, scale_td=0.1)
    with pytest.raises(ValueError, match="NaN"):
        fit_level(bu.clone().fill_(float("nan")), td, scale_td=0.1)
    with pytest.raises(ValueError, match="nothing is 'on'"):
        fit_level(bu, torch.zeros_like(td), scale_td=0.1)


def test_fit_observation_model_writes_every_level_of_the_model():
    from pyro_backpass import Backbone, GenerativeModel, Scenes, fit_observation_model

    bb = Backbone.default()
    gm = GenerativeModel.for_backbone(bb, num_components=1)
    fit = fit_observation_model(gm, bb, list(Scenes(2, seed=3)), progress=False)
    assert set(fit.levels) == set(gm.hidden_levels) and fit.n_objects >= 2
    for name, level in fit.levels.items():
        obs = gm.observations[name]
        assert float(obs.threshold) == pytest.approx(level.threshold)
        assert float(obs.scale_off) == pytest.approx(level.scale_off)
        torch.testing.assert_close(obs.scale_on.reshape(-1), level.scale_on)
        assert 0 < level.on_fraction < 1
        sigma0 = float(gm.steps[name].scale_td)
        bound = level.scale_off**2 * (1 + 1e-5)  # σ0² + σ1² ≤ σ2², in float32
        assert (level.scale_on.double() ** 2 + sigma0**2 <= bound).all()
    with pytest.raises(ValueError, match="unknown levels"):
        fit_observation_model(gm, bb, list(Scenes(1, seed=3)), levels=["pool9"], progress=False)


def test_ppc_statistics_match_a_direct_count_and_have_arviz_shapes():
    from pyro_backpass import Backbone, GenerativeModel, Scenes
    from pyro_backpass.learning import observation_ppc, observation_statistics

    g = torch.Generator().manual_seed(0)
    bu = torch.randn(3, 2, 4, 4, generator=g)
    used = torch.rand(3, 1, 4, 4, generator=g) > 0.3
    stats_ = observation_statistics(bu, used, 0.5)
    for o in range(3):
        sel = bu[o][used[o].expand(2, 4, 4)]
        above = sel[sel >= 0.5]
        assert float(stats_["frac_above"][o]) == pytest.approx(above.numel() / sel.numel())
        assert float(stats_["mean_above"][o]) == pytest.approx(float(above.mean()), rel=1e-6)
    bb = Backbone.default()
    gm = GenerativeModel.for_backbone(bb, num_components=1)
    idata = observation_ppc(gm, bb, list(Scenes(1, seed=3)), levels=["pool4"], draws=7)
    pp = idata.posterior_predictive["pool4_frac_above"]
    obs = idata.observed_data["pool4_frac_above"]
    assert pp.shape[:2] == (1, 7) and pp.shape[2] == obs.shape[0]


def test_fit_background_is_the_per_channel_mean_and_std_outside_the_objects():
    """fit_background against numpy over the cells no instance touches."""
    from types import SimpleNamespace

    import numpy as np

    from pyro_backpass import GenerativeModel
    from pyro_backpass.learning import fit_background

    gm = GenerativeModel.random([3, "M"], num_components=2, num_categories=2, image_size=8)
    g = torch.Generator().manual_seed(1)
    acts = {"conv1_1": 2 * torch.rand(4, 3, 8, 8, generator=g),
            "pool1": torch.rand(4, 3, 4, 4, generator=g)}  # fmt: skip
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[2, 5:, 5:] = True
    scenes = [
        SimpleNamespace(image=torch.full((3, 8, 8), float(i)),
                        instances=[SimpleNamespace(amodal_mask=masks[i])] if masks[i].any() else [])
        for i in range(4)
    ]  # fmt: skip

    def backbone(images):
        idx = images[:, 0, 0, 0].long()
        return {k: v[idx] for k, v in acts.items()}

    gm.observations["pool1"].scale_off.fill_(10.0)  # the floor wins on pool1
    fitted = fit_background(gm, backbone, scenes, levels=["conv1_1", "pool1"], batch_size=3)
    for name, (beta, s2) in fitted.items():
        a = acts[name].numpy()
        h = a.shape[-1]
        f = 8 // h
        values = [[] for _ in range(3)]
        for b in range(4):
            for i in range(h):
                for j in range(h):
                    if not masks[b, i * f : (i + 1) * f, j * f : (j + 1) * f].any():
                        for c in range(3):
                            values[c].append(a[b, c, i, j])
        want_beta = [np.mean(v) for v in values]
        floor = 10.0 if name == "pool1" else float(GenerativeModel.random(
            [3, "M"], num_components=2, num_categories=2, image_size=8
        ).observations[name].scale_off)  # fmt: skip
        want_s2 = [max(np.std(v), floor) for v in values]
        assert beta.tolist() == pytest.approx(want_beta, rel=1e-5)
        assert s2.tolist() == pytest.approx(want_s2, rel=1e-5)
        obs = gm.observations[name]
        assert obs.background.shape == (3, 1, 1)
        assert obs.scale_off.flatten().tolist() == pytest.approx(want_s2, rel=1e-5)
