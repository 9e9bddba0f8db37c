"""The parser's stop criterion: the statistic, its fit (against scipy's optimiser on the same
objective) and the parser stopping where the statistic says."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from pyro_backpass import GenerativeModel
from pyro_backpass.parsing import (
    STOP_FEATURES,
    StopCriterion,
    fit_stop_criterion,
    region_log_prob,
    run_parse,
    stop_features,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_statistic_is_the_affine_form_of_the_features():
    crit = StopCriterion({"llr": 2.0, "step": -1.0, "log_visible": 0.5}, bias=0.3,
                         mean={"llr": 10.0}, scale={"llr": 4.0})  # fmt: skip
    got = crit.statistic(llr=18.0, visible=99, amodal=200, step=2)
    assert got == pytest.approx(0.3 + 2.0 * (18.0 - 10.0) / 4.0 - 2.0 + 0.5 * math.log(100.0))
    assert stop_features(llr=1.0, visible=50, amodal=200, step=3)["visible_fraction"] == 0.25
    assert StopCriterion.llr().statistic(llr=-7.5, visible=3, amodal=9, step=4) == -7.5
    assert StopCriterion.llr().is_llr and not crit.is_llr
    assert StopCriterion.from_dict(crit.to_dict()) == crit


def test_bad_criteria_are_refused():
    with pytest.raises(ValueError, match="unknown feature 'area'"):
        StopCriterion({"area": 1.0})
    with pytest.raises(ValueError, match="finite"):
        StopCriterion({"llr": math.nan})
    with pytest.raises(ValueError, match="> 0"):
        StopCriterion({"llr": 1.0}, scale={"llr": 0.0})
    with pytest.raises(ValueError, match="not a StopCriterion record"):
        StopCriterion.from_dict({"threshold": 1.0})
    with pytest.raises(ValueError, match="both labels"):
        fit_stop_criterion([stop_features(llr=1, visible=1, amodal=1, step=0)], [True])


def test_fit_matches_scipy_on_the_same_objective():
    rng = np.random.default_rng(0)
    n = 300
    raw = [dict(llr=float(rng.normal(0, 1e3)), visible=int(rng.integers(0, 900)),
                amodal=int(rng.integers(900, 1200)), step=int(rng.integers(0, 5)),
                class_log_prob=float(rng.normal(-1.0, 1.0)))
           for _ in range(n)]  # fmt: skip
    steps = [stop_features(**r) for r in raw]
    x = np.array([[s[f] for f in STOP_FEATURES] for s in steps])
    z = (x - x.mean(0)) / x.std(0, ddof=1)
    logits = 1.5 * z[:, 1] - 0.8 * z[:, 3] + 0.7 * z[:, 4] - 1.0
    y = rng.random(n) < 1 / (1 + np.exp(-logits))
    crit = fit_stop_criterion(steps, list(y), l2=2.0)

    def objective(theta):  # the penalised negative log-likelihood, written out
        w, b = theta[:-1], theta[-1]
        t = z @ w + b
        return np.sum(np.logaddexp(0, t) - y * t) + 0.5 * 2.0 * w @ w

    ref = minimize(objective, np.zeros(len(STOP_FEATURES) + 1), method="BFGS", tol=1e-10).x
    got = np.array([crit.weights[f] for f in STOP_FEATURES] + [crit.bias])
    np.testing.assert_allclose(got, ref, atol=1e-4)
    # The statistic is the reference model's log-odds of each step.
    for r, zi in zip(raw[:20], z[:20], strict=True):
        assert crit.statistic(**r) == pytest.approx(zi @ ref[:-1] + ref[-1], abs=1e-3)


def test_parser_stops_where_the_statistic_says():
    """statistic = 1.5 − step: two instances, then a stop with statistic −0.5 (by construction,
    whatever the image); each instance's score is the statistic of its own features."""
    gm = GenerativeModel.default()
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    crit = StopCriterion({"step": -1.0}, bias=1.5)
    p = run_parse(gm, image, criterion=crit, threshold=0.0)
    assert len(p.instances) == 2 and p.stop_reason == "below_threshold"
    assert p.stop_score == pytest.approx(-0.5)
    claimed = torch.zeros(64, 64, dtype=torch.bool)
    for k, inst in enumerate(p.instances):
        assert inst.score == pytest.approx(1.5 - k)
        assert math.isfinite(inst.llr)
        visible = inst.amodal_mask & ~claimed
        assert torch.equal(visible, inst.mask)
        claimed |= visible
    # With the LLR criterion the statistic is the LLR (the paper's criterion).
    q = run_parse(gm, image, criterion=StopCriterion.llr(), threshold=-math.inf, max_objects=1)
    assert q.instances[0].score == pytest.approx(q.instances[0].llr)
    with pytest.raises(TypeError, match="StopCriterion"):
        run_parse(gm, image, criterion={"llr": 1.0})


def test_statistic_counts_pixels_in_the_models_frame():
    """The same scene at twice the size (each pixel repeated, so the view is the same 64 px
    input): the first step's statistic is about the same, not shifted by the 4× pixel count
    (0.67 · log 4 / 2.03 ≈ 0.46 with the shipped weights, were pixels counted in the image)."""
    from pyro_backpass import make_scene, split_seed

    gm = GenerativeModel.default()
    image = make_scene(seed=split_seed("test", 3)).image
    big = image.repeat_interleave(2, 1).repeat_interleave(2, 2)  # (3, 128, 128)
    a = run_parse(gm, image, max_objects=1, threshold=-math.inf).instances[0]
    b = run_parse(gm, big, max_objects=1, threshold=-math.inf).instances[0]
    assert int(b.mask.sum()) > 2 * int(a.mask.sum())  # image-space pixels do differ
    assert abs(a.score - b.score) < 0.1


def test_fit_weighs_the_features_every_step_has():
    """Without class_log_prob in the steps the fit weighs the four others; asked for it, the
    fit says which steps lack it."""
    rng = np.random.default_rng(1)
    steps = [
        stop_features(llr=float(v), visible=10, amodal=20, step=0) for v in rng.normal(size=40)
    ]
    labels = [bool(s["llr"] > 0) for s in steps]
    assert set(fit_stop_criterion(steps, labels).weights) == set(STOP_FEATURES) - {"class_log_prob"}
    with pytest.raises(ValueError, match="lack the features"):
        fit_stop_criterion(steps, labels, features=["llr", "class_log_prob"])


def test_class_log_prob_is_the_classifiers_on_the_visible_region():
    """region_log_prob with the whole image as the region is the classifier's own
    log-probability of the image; a parse whose statistic is class_log_prob scores each
    instance by it on that instance's visible mask; a criterion weighing it needs the value and
    a classifier head."""
    import copy

    from pyro_backpass import make_scene, split_seed

    gm = GenerativeModel.default()
    bb = gm.backbone
    image = make_scene(seed=split_seed("test", 5)).image
    whole = torch.ones(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        ref = torch.log_softmax(bb.logits(bb(image[None])), -1)[0]  # (classes,)
    for c in range(len(bb.categories)):
        got = region_log_prob(bb, image, whole, [c])
        assert got.shape == (1,) and float(got[0]) == pytest.approx(float(ref[c]), abs=1e-5)
    crit = StopCriterion({"class_log_prob": 1.0})
    assert crit.needs_class_log_prob and not StopCriterion.llr().needs_class_log_prob
    assert StopCriterion({"llr": 1.0, "class_log_prob": 0.0}).needs_class_log_prob
    with pytest.raises(ValueError, match="one category per mask"):
        region_log_prob(bb, image, whole.expand(2, 64, 64), [0])
    with pytest.raises(ValueError, match="category indices"):
        region_log_prob(bb, image, whole, [len(bb.categories)])
    with pytest.raises(ValueError, match="weighs class_log_prob"):
        crit.statistic(llr=1.0, visible=1, amodal=1, step=0)
    p = run_parse(gm, image, criterion=crit, threshold=-math.inf, max_objects=2)
    assert len(p.instances) == 2
    for inst in p.instances:
        index = [bb.categories.index(inst.category)]
        want = float(region_log_prob(bb, image, inst.mask[None], index)[0])
        assert inst.score == pytest.approx(want, abs=1e-5) and want <= 0.0
    headless = copy.deepcopy(bb)
    headless.head = None
    with pytest.raises(ValueError, match="classifier head"):
        run_parse(gm, image, criterion=crit, backbone=headless, max_objects=1)
