"""Hard EM: the vectorised E-step against a per-hypothesis loop, the per-sample forward against
phi_all, and a small end-to-end fit."""

import math

import pytest
import torch

from pyro_backpass import Backbone, GenerativeModel, RenderedObjects, log_joint
from pyro_backpass.learning.e_step import e_step_level, window_scores
from pyro_backpass.learning.hard_em import EMConfig, fit_hard_em
from pyro_backpass.model import NGramPrior
from tests.oracles import shift_loop


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_window_scores_equal_a_loop_over_shifted_copies(radius):
    g = torch.Generator().manual_seed(radius)
    target = torch.rand(3, 2, 5, 6, generator=g).double()
    phi = torch.rand(3, 4, 2, 5, 6, generator=g).double()
    offsets = torch.tensor([(dy, dx) for dy in range(-radius, radius + 1)
                            for dx in range(-radius, radius + 1)] + [(9, 0)])  # fmt: skip
    got = window_scores(target, phi, offsets, scale_td=0.3)
    for b in range(3):
        for k in range(4):
            for d, (dy, dx) in enumerate(offsets.tolist()):
                shifted = shift_loop(phi[b, k], dy, dx)
                want = torch.distributions.Normal(shifted, 0.3).log_prob(target[b]).sum()
                assert float(got[b, k, d]) == pytest.approx(float(want), rel=1e-9, abs=1e-9)


@torch.no_grad()
def test_e_step_is_the_argmax_of_prior_plus_gaussian_score():
    gm = GenerativeModel.random([3, "M"], num_components=3, num_categories=2, image_size=8)
    step = gm.steps["pool1"]  # template level: upper = category indices
    g = torch.Generator().manual_seed(0)
    cats = torch.tensor([0, 1, 1, 0])
    target = torch.rand(4, *step.out.shape, generator=g)
    lpg = torch.log_softmax(torch.randn(4, 3, generator=g), -1)
    lpd = torch.log_softmax(torch.randn(step.num_offsets, generator=g), -1)
    gamma, delta, best = e_step_level(step, cats, target, log_prior_gamma=lpg, log_prior_delta=lpd)
    for b in range(4):
        scores = torch.empty(3, step.num_offsets)
        for k in range(3):
            for d in range(step.num_offsets):
                phi = step.phi(cats[b : b + 1], torch.tensor([k]), torch.tensor([d]))[0]
                lp = torch.distributions.Normal(phi, float(step.scale_td)).log_prob(target[b])
                scores[k, d] = lp.sum() + lpg[b, k] + lpd[d]
        flat = int(scores.reshape(-1).argmax())
        assert (int(gamma[b]), int(delta[b])) == (flat // step.num_offsets, flat % step.num_offsets)
        assert float(best[b]) == pytest.approx(float(scores.max()), rel=1e-4)


@pytest.mark.parametrize("level", ["image", "conv1_1", "pool1"])
@torch.no_grad()
def test_per_sample_forward_equals_phi_all_gathered(level):
    gm = GenerativeModel.random([4, "M", 4], num_components=3, num_categories=2, image_size=8)
    names = [s.name for s in gm.levels]
    upper_name = names[names.index(level) + 1]
    g = torch.Generator().manual_seed(1)
    upper = torch.rand(5, *gm.steps[upper_name].out.shape, generator=g)
    gamma = torch.tensor([2, 0, 2, 1, 0])
    step = gm.steps[level]
    want = step.phi_all(upper)[torch.arange(5), gamma]
    torch.testing.assert_close(step.phi_per_sample(upper, gamma), want)


def _objects(bb, n):
    imgs, masks, labels = [], [], []
    for c, cat in enumerate(bb.categories[:2]):
        ds = RenderedObjects(cat, n, seed=7)
        for i in range(n):
            im, m = ds[i]
            imgs.append(im), masks.append(m), labels.append(c)
    return torch.stack(imgs), torch.stack(masks), torch.tensor(labels)


def test_fit_hard_em_runs_end_to_end_and_keeps_every_table_entry_positive():
    bb = Backbone.default()
    images, masks, labels = _objects(bb, 6)
    gm = GenerativeModel.for_backbone(bb, num_components=2)
    cfg = EMConfig(iterations=1, epochs=1, init_epochs=2, batch_size=8, top_init_iterations=2)
    result = fit_hard_em(gm, bb, (images, masks, labels), config=cfg, progress=False)
    assert [it.iteration for it in result.log] == [0, 1]
    first = result.log[0].rms_error
    for name in gm.hidden_levels:
        assert math.isfinite(first[name]) and first[name] > 0
        assert sum(result.log[-1].usage[name]) == len(labels)
        assert float(gm.steps[name].scale_td) > 0
        prior = gm.priors[f"gamma_{name}"]
        assert isinstance(prior, NGramPrior) and bool((prior.probs > 0).all())
    # The fitted model runs the backward pass and scores its own assignment.
    with torch.no_grad():
        bu = {k: v for k, v in bb(images[:2]).items() if k in gm.hidden_levels}
    lj = log_joint(gm, bu, {s: v[:2] for s, v in result.assignment.items()})
    assert torch.isfinite(lj).all()


def test_fit_hard_em_rejects_bad_objects():
    bb = Backbone.default()
    images, masks, labels = _objects(bb, 1)
    gm = GenerativeModel.for_backbone(bb, num_components=1)
    with pytest.raises(ValueError, match="masks"):
        fit_hard_em(gm, bb, (images, masks.float(), labels), progress=False)
    with pytest.raises(ValueError, match="labels"):
        fit_hard_em(gm, bb, (images, masks, labels.float()), progress=False)
    with pytest.raises(ValueError, match="labels in"):
        fit_hard_em(gm, bb, (images, masks, labels + 10), progress=False)
