"""The second stage of the verified pass (issue #10): the completions below a kept top level
against one greedy call per clamped state, the second stage's choice against brute force over
those completions, its examples against hand-computed IoU, and its errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pyro_backpass import DescentVerifier, greedy_map, verified_map
from pyro_backpass.inference import (
    check_verifier,
    lower_completions,
    lower_sites,
    verifier_fingerprint,
)
from pyro_backpass.learning import fit_descent_verifier, lower_descent_examples

pytestmark = pytest.mark.usefixtures("one_thread")
K = 3


@pytest.fixture(scope="module")
def case(airplane_scene):
    return airplane_scene


def _area_verifier(gm, sign: float, *, levels_below: int = 0) -> DescentVerifier:
    """Scores a descent by ``sign`` × log(1 + its mask's pixels) (the area column); airplane
    only."""
    n, f = len(gm.categories), 400
    weight = torch.zeros(n, f, dtype=torch.float64)
    weight[0, len(gm.hidden_levels) + 1] = sign
    return DescentVerifier(categories=gm.categories, read_levels=("pool3", "conv4_1", "pool4"),
                           weight=weight, mean=torch.zeros(n, f), scale=torch.ones(n, f),
                           fitted=torch.tensor([True] + [False] * (n - 1)), top_k=K,
                           levels_below=levels_below)  # fmt: skip


def _top(gm, assignment) -> dict[str, int]:
    name = gm.hidden_levels[-1]
    return {s: int(assignment[s][0]) for s in (f"gamma_{name}", f"delta_{name}")}


def test_completions_are_every_state_below_the_kept_top(case):
    gm, _, bu = case
    plain = greedy_map(gm, bu, category="airplane")
    top = _top(gm, plain.assignment)
    sites = lower_sites(gm, 2)
    assert sites == ["gamma_conv4_1", "delta_conv4_1", "gamma_pool3", "delta_pool3"]
    fixed = {"gamma_conv4_1": 2}
    result = lower_completions(gm, bu, category="airplane", top=top, clamp=fixed)
    ranges = [[2] if s in fixed else range(gm.site_sizes[s]) for s in sites]
    states = list(itertools.product(*ranges))
    assert len(result.log_joint) == len(states) == 45
    for j, state in enumerate(states):
        assert tuple(int(result.assignment[s][j]) for s in sites) == state
        assert all(int(result.assignment[s][j]) == v for s, v in top.items())
    for j in (0, 17, 44):  # the oracle: one greedy call with the state clamped
        clamp = {**top, **dict(zip(sites, states[j], strict=True))}
        one = greedy_map(gm, bu, category="airplane", clamp=clamp)
        for s, v in one.assignment.items():
            assert int(result.assignment[s][j]) == int(v[0]), (j, s)
        assert torch.equal(result.mask[j], one.mask[0])
        assert float(result.log_joint[j]) == pytest.approx(float(one.log_joint[0]), rel=1e-5)
    # greedy's own descent lies among the completions of its own top level
    own = lower_completions(
        gm,
        bu,
        category="airplane",
        top=top,
        clamp={"gamma_conv4_1": int(plain.assignment["gamma_conv4_1"][0])},
    )
    same = torch.ones(len(own.log_joint), dtype=torch.bool)
    for s, v in plain.assignment.items():
        same &= own.assignment[s] == v
    assert int(same.sum()) == 1


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_second_stage_keeps_the_completion_it_scores_highest(case, sign):
    gm, _, bu = case
    first, second = _area_verifier(gm, 1.0), _area_verifier(gm, sign, levels_below=2)
    clamp = {"gamma_conv4_1": 1, "gamma_pool3": 3}  # 9 completions: a brute force in seconds
    one_stage = verified_map(gm, bu, category="airplane", verifier=first, clamp=clamp,
                             lower=False)  # fmt: skip
    result = verified_map(gm, bu, category="airplane", verifier=first, clamp=clamp, lower=second)
    top = _top(gm, one_stage.assignment)
    assert _top(gm, result.assignment) == top  # the first stage's top level is kept
    best, best_area = None, None
    for d in range(gm.site_sizes["delta_pool3"]):  # brute force over the completions
        one = greedy_map(gm, bu, category="airplane", clamp={**top, **clamp, "delta_pool3": d})
        area = sign * float(np.log1p(one.mask[0].sum().item()))
        if best is None or area > best_area:
            best, best_area = one, area
    for s, v in best.assignment.items():
        assert int(result.assignment[s][0]) == int(v[0]), s
    assert torch.equal(result.mask[0], best.mask[0])
    assert float(result.log_joint[0]) == pytest.approx(float(best.log_joint[0]), rel=1e-5)
    assert result.modes == one_stage.modes  # the first stage's list, in its order


def test_second_stage_errors(case, tmp_path, monkeypatch):
    gm, _, bu = case
    first, second = _area_verifier(gm, 1.0), _area_verifier(gm, 1.0, levels_below=2)
    with pytest.raises(ValueError, match="pass it as lower="):
        verified_map(gm, bu, category="airplane", verifier=second)
    with pytest.raises(ValueError, match="pass it as lower="):  # what the parser checks
        check_verifier(gm, second)
    monkeypatch.setattr(DescentVerifier, "shipped",
                        classmethod(lambda cls, *, lower=False: None))  # fmt: skip
    with pytest.raises(ValueError, match="no second-stage descent verifier is shipped"):
        verified_map(gm, bu, category="airplane", verifier=first, lower=True)
    with pytest.raises(ValueError, match="clamp disagrees with top"):
        lower_completions(gm, bu, category="airplane", top={"gamma_pool4": 0, "delta_pool4": 0},
                          clamp={"gamma_pool4": 1})  # fmt: skip
    with pytest.raises(ValueError, match="first_stage_sha256 is for a second stage"):
        DescentVerifier(**{**_kwargs(first), "first_stage_sha256": "0" * 64})
    with pytest.raises(ValueError, match="must be a second-stage verifier"):
        verified_map(gm, bu, category="airplane", verifier=first, lower=first)
    with pytest.raises(ValueError, match="second-stage verifier has no weights for 'bird'"):
        bird_first = DescentVerifier(**{**_kwargs(first), "fitted": torch.ones(5, dtype=bool)})
        verified_map(gm, bu, category="bird", verifier=bird_first, lower=second)
    with pytest.raises(ValueError, match="levels_below must be in"):
        lower_sites(gm, len(gm.hidden_levels))
    with pytest.raises(ValueError, match="top must give exactly"):
        lower_completions(gm, bu, category="airplane", top={"gamma_pool4": 0})
    two = {k: v.expand(2, *v.shape[1:]) for k, v in bu.items()}
    with pytest.raises(ValueError, match="one image"):
        lower_completions(gm, two, category="airplane", top={"gamma_pool4": 0, "delta_pool4": 0})
    with pytest.raises(ValueError, match="levels_below must be an int >= 0"):
        DescentVerifier(**{**_kwargs(first), "levels_below": -1})
    back = DescentVerifier.load(second.save(tmp_path / "second.safetensors"))
    assert back.levels_below == 2 and back.fingerprint() == second.fingerprint()
    assert "levels_below" not in first.config()  # a first stage's fingerprint is unchanged
    assert not first.same_setup(second)


def test_second_stage_per_image_clamps_and_occlusion(case):
    """Two images in one call, each with its own clamps and occluder: each image's answer is
    the brute force over its own completions (one greedy call per state, the same occluder),
    and a category clamp given by name is accepted."""
    gm, _, bu = case
    first, second = _area_verifier(gm, 1.0), _area_verifier(gm, -1.0, levels_below=2)
    two = {k: torch.cat([v, v.flip(-1)]) for k, v in bu.items()}  # (2, C, H, W)
    hidden = torch.ones(2, 1, 64, 64, dtype=torch.bool)
    hidden[1, :, :, :24] = False  # image 1: its left part unobserved
    observed = {"image": hidden}
    clamp = {"gamma_conv4_1": torch.tensor([1, 3]), "gamma_pool3": torch.tensor([3, 0]),
             "category": "airplane"}  # fmt: skip
    result = verified_map(gm, two, category="airplane", verifier=first, clamp=clamp,
                          observed=observed, lower=second)  # fmt: skip
    for i in range(2):
        one = {k: v[i : i + 1] for k, v in two.items()}
        mine = {"gamma_conv4_1": int(clamp["gamma_conv4_1"][i]),
                "gamma_pool3": int(clamp["gamma_pool3"][i])}  # fmt: skip
        obs = {"image": hidden[i : i + 1]}
        top = _top(gm, {s: v[i : i + 1] for s, v in result.assignment.items()})
        best, best_area = None, None
        for d in range(gm.site_sizes["delta_pool3"]):
            r = greedy_map(gm, one, category="airplane", observed=obs,
                           clamp={**top, **mine, "delta_pool3": d})  # fmt: skip
            area = -float(np.log1p(r.mask[0].sum().item()))
            if best is None or area > best_area:
                best, best_area = r, area
        for s, v in best.assignment.items():
            assert int(result.assignment[s][i]) == int(v[0]), (i, s)


def test_lower_none_pairs_by_the_first_stage(case, monkeypatch):
    """``lower=None`` uses a shipped second stage only behind the first stage it records;
    an explicit one recorded behind another first stage is an error."""
    gm, _, bu = case
    first = _area_verifier(gm, 1.0)
    other = _area_verifier(gm, -1.0)
    small = _area_verifier(gm, -1.0, levels_below=2)
    paired = DescentVerifier(**{**_kwargs(small), "first_stage_sha256": first.fingerprint(),
                                "model_sha256": verifier_fingerprint(gm)})  # fmt: skip
    monkeypatch.setattr(
        DescentVerifier,
        "shipped",
        classmethod(lambda cls, *, lower=False: paired if lower else first),
    )
    clamp = {"gamma_conv4_1": 1, "gamma_pool3": 3}
    staged = verified_map(gm, bu, category="airplane", verifier=first, clamp=clamp, lower=paired)
    auto = verified_map(gm, bu, category="airplane", verifier=first, clamp=clamp)
    as_lists = lambda r: {k: v.tolist() for k, v in r.assignment.items()}  # noqa: E731
    assert as_lists(auto) == as_lists(staged)  # lower=None: the paired shipped stage
    plain = verified_map(gm, bu, category="airplane", verifier=other, clamp=clamp, lower=False)
    unpaired = verified_map(gm, bu, category="airplane", verifier=other, clamp=clamp)
    assert as_lists(unpaired) == as_lists(plain)  # behind another first stage: none
    with pytest.raises(ValueError, match="fitted behind another first stage"):
        verified_map(gm, bu, category="airplane", verifier=other, clamp=clamp, lower=paired)


def _kwargs(v: DescentVerifier) -> dict:
    return dict(categories=v.categories, read_levels=v.read_levels, weight=v.weight,
                mean=v.mean, scale=v.scale, fitted=v.fitted, top_k=v.top_k,
                levels_below=v.levels_below, model_sha256=v.model_sha256)  # fmt: skip


def test_second_stage_examples_and_fit(case):
    gm, scene, bu = case
    first = _area_verifier(gm, 1.0)
    (ex,) = lower_descent_examples(gm, [scene], first_stage=first, levels_below=1,
                                   categories=["airplane"], progress=False)  # fmt: skip
    chosen = verified_map(gm, bu, category="airplane", verifier=first, lower=False)
    top = _top(gm, chosen.assignment)
    truth = [t.mask.numpy() for t in scene.instances if t.category == "airplane" and t.mask.any()]
    assert len(ex.iou) == gm.site_sizes["gamma_conv4_1"] * gm.site_sizes["delta_conv4_1"]
    for g in range(len(ex.iou)):  # the oracle: each completion's mask, IoU by numpy
        one = greedy_map(gm, bu, category="airplane", clamp={**top, "gamma_conv4_1": g})
        m = one.mask[0].numpy()
        iou = max((m & t).sum() / max((m | t).sum(), 1) for t in truth)
        assert float(ex.iou[g]) == pytest.approx(iou, abs=1e-6)
        if g == ex.anchor:  # the first stage's own descent
            assert torch.equal(one.mask[0], chosen.mask[0])
    assert int(chosen.assignment["gamma_conv4_1"][0]) == ex.anchor
    assert ex.levels_below == 1 and ex.top_k == K
    fit = fit_descent_verifier(gm, examples=[ex, ex], first_stage=first, levels_below=1,
                               categories=["airplane"], progress=False)  # fmt: skip
    assert fit.levels_below == 1 and fit.top_k == K
    assert fit.first_stage_sha256 == first.fingerprint()
    with pytest.raises(ValueError, match="examples were made for levels_below=1, not 0"):
        fit_descent_verifier(gm, examples=[ex], top_k=K, progress=False)
    with pytest.raises(ValueError, match="needs first_stage"):
        fit_descent_verifier(gm, [scene], levels_below=1, progress=False)
