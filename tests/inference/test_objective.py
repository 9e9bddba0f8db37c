"""The fast path and the Pyro model agree: log_joint == the model's trace log-density."""

import pytest
import torch
from pyro import poutine

from pyro_backpass import GenerativeModel, greedy_map, log_joint, sample


def model_log_density(gm, bu, assignment, td, **kwargs):
    data = dict(assignment) | {f"td_{n}": td[n] for n in gm.hidden_levels}
    conditioned = poutine.condition(gm.model, data=data)
    trace = poutine.trace(conditioned).get_trace(bu, **kwargs)
    return trace.log_prob_sum()


@pytest.mark.parametrize("with_category", [False, True])
@pytest.mark.parametrize("cfg", [[3, "M"], [2, "M", 3, "M"]])
def test_greedy_log_joint_equals_model_trace(cfg, with_category):
    gm = GenerativeModel.random(cfg, num_components=3, num_categories=2, image_size=8)
    s = sample(gm, 3, observe=True, seed=0)
    bu = dict(s.bu)
    if with_category:
        bu["category"] = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    r = greedy_map(gm, bu)
    with torch.no_grad():
        expect = model_log_density(gm, bu, r.assignment, r.td)
    assert r.log_joint.sum().item() == pytest.approx(expect.item(), rel=1e-5)


def test_boundary_heavy_case_and_masks_agree():
    """Scenes of pure background: the off-branch wins at the boundary almost everywhere."""
    gm = GenerativeModel.random([3, "M"], num_components=2, num_categories=1, image_size=8,
                                scale_on=0.05, scale_off=0.05)  # fmt: skip
    s = sample(gm, 2, seed=1)
    bu = {n: torch.zeros_like(s.td[n]) for n in gm.hidden_levels}
    observed = {"image": torch.rand(2, 1, 8, 8) > 0.3}
    r = greedy_map(gm, bu, observed=observed)
    lam = gm.observations["conv1_1"].threshold
    on_boundary = (r.td["conv1_1"] < lam) & (r.td["conv1_1"] > lam - 1e-6)
    assert on_boundary.sum() >= 5
    with torch.no_grad():
        expect = model_log_density(gm, bu, r.assignment, r.td, observed=observed)
        direct = log_joint(gm, bu, r.assignment, observed=observed)
    assert r.log_joint.sum().item() == pytest.approx(expect.item(), rel=1e-5)
    torch.testing.assert_close(direct, r.log_joint)


def test_log_joint_is_higher_at_the_truth_than_at_a_wrong_category():
    gm = GenerativeModel.random([3, "M"], num_components=2, num_categories=2, image_size=8)
    s = sample(gm, 4, observe=True, seed=2)
    wrong = dict(s.assignment)
    wrong["category"] = 1 - s.assignment["category"]
    with torch.no_grad():
        assert (log_joint(gm, s.bu, s.assignment) > log_joint(gm, s.bu, wrong)).all()
    with pytest.raises(ValueError, match="missing sites"):
        log_joint(gm, s.bu, {"category": 0})
