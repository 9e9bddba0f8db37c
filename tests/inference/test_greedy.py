import itertools

import pytest
import torch

from pyro_backpass import (
    CategoricalPrior,
    GenerativeModel,
    LevelSpec,
    closed_form_td,
    greedy_map,
    log_joint,
    sample,
)
from pyro_backpass.inference.greedy import level_scores
from tests.oracles import phi_loop


def one_level_model(seed=0):
    """image directly below category: one hidden level, a template step."""
    levels = [LevelSpec("image", "image", 3, 6, 6), LevelSpec("category", "category", 3, 1, 1)]
    gm = GenerativeModel(levels, categories=["a", "b", "c"], num_components=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gm.steps["image"].weight.copy_(torch.randn(3, 4, 3, 6, 6, generator=g))
    return gm


def brute_force_level(gm, name, upper, bu_l, fixed_logp):
    """argmax over (γ, δ) of prior + Σ closed-form score, by loops over hypotheses."""
    step, obs = gm.steps[name], gm.observations[name]
    best, arg = -float("inf"), None
    for g, d in itertools.product(range(step.num_components), range(step.num_offsets)):
        with torch.no_grad():
            phi = phi_loop(step, upper, g, d)
        _, s = closed_form_td(
            None if bu_l is None else bu_l, phi, threshold=obs.threshold,
            background=obs.background, scale_td=step.scale_td, scale_on=obs.scale_on,
            scale_off=obs.scale_off,
        )  # fmt: skip
        total = float((fixed_logp(g, d) + s.sum()).detach())
        if total > best:
            best, arg = total, (g, d)
    return arg, best


def test_one_level_model_equals_brute_force():
    gm = one_level_model()
    s = sample(gm, 5, observe=True, seed=3)
    result = greedy_map(gm, s.bu)
    prior_c = gm.priors["category"].log_probs()
    prior_g = gm.priors["gamma_image"].log_probs()
    prior_d = gm.priors["delta_image"].log_probs()
    for i in range(5):
        best, arg = -float("inf"), None
        for c in range(3):
            (g, d), score = brute_force_level(
                gm,
                "image",
                c,
                s.bu["image"][i],
                lambda g, d, c=c: prior_c[c] + prior_g[c, g] + prior_d[d],
            )
            if score > best:
                best, arg = score, (c, g, d)
        got = tuple(
            int(result.assignment[k][i]) for k in ("category", "gamma_image", "delta_image")
        )
        assert got == arg
        assert result.log_joint[i].item() == pytest.approx(best, rel=1e-5)


def _assert_each_level_is_the_brute_force_argmax(gm, bu, r, n):
    """Below the top, each image's (γ, δ) is the per-hypothesis argmax given F̂ above."""
    for i in range(n):
        for j, name in enumerate(gm.hidden_levels[:-1]):
            upper = r.td[gm.hidden_levels[j + 1]][i]
            parent = r.assignment[gm.gamma_parents(name)[0]][i]
            lg = gm.priors[f"gamma_{name}"].log_probs()[parent]
            ld = gm.priors[f"delta_{name}"].log_probs()
            (g, d), _ = brute_force_level(
                gm, name, upper, bu[name][i], lambda g, d, lg=lg, ld=ld: lg[g] + ld[d]
            )
            got = (int(r.assignment[f"gamma_{name}"][i]), int(r.assignment[f"delta_{name}"][i]))
            assert got == (g, d), name


def test_each_level_is_the_brute_force_argmax_given_the_levels_above():
    gm = GenerativeModel.random([3, "M", 4], num_components=3, num_categories=2, image_size=8)
    s = sample(gm, 3, observe=True, seed=1)
    r = greedy_map(gm, s.bu)
    _assert_each_level_is_the_brute_force_argmax(gm, s.bu, r, 3)


def test_recovers_the_truth_at_the_models_own_noise():
    gm = GenerativeModel.random([4, "M"], num_components=3, num_categories=2, image_size=12)
    s = sample(gm, 8, observe=True, seed=2)
    r = greedy_map(gm, s.bu)
    agree = sum(
        all(int(r.assignment[k][i]) == int(s.assignment[k][i]) for k in gm.sites) for i in range(8)
    )
    assert agree >= 6
    assert (r.log_joint >= log_joint(gm, s.bu, s.assignment) - 1e-3).sum() >= 7


def test_options_category_clamp_priors_topk_and_chunking():
    gm = GenerativeModel.random([3, "M"], num_components=3, num_categories=2, image_size=8)
    s = sample(gm, 2, observe=True, seed=4)
    r = greedy_map(gm, s.bu, category="c1", clamp={"gamma_conv1_1": 2})
    assert r.assignment["category"].tolist() == [1, 1]
    assert r.assignment["gamma_conv1_1"].tolist() == [2, 2]
    # A location preference moves the top offset.
    pref = torch.zeros(25)
    pref[7] = 1.0
    r = greedy_map(gm, s.bu, priors={"delta_pool1": CategoricalPrior(pref)})
    assert r.assignment["delta_pool1"].tolist() == [7, 7]
    # top_k: sorted, the first is the MAP, and chunking does not change the answer.
    r5 = greedy_map(gm, s.bu, top_k=5)
    r5c = greedy_map(gm, s.bu, top_k=5, chunk_elements=100)
    for i in range(2):
        lj = [m[1] for m in r5.modes[i]]
        assert lj == sorted(lj, reverse=True) and len(lj) == 5
        assert lj[0] == pytest.approx(r5.log_joint[i].item())
        assert r5.modes[i][0][0] == {k: int(v[i]) for k, v in r5.assignment.items()}
        assert [m[0] for m in r5c.modes[i]] == [m[0] for m in r5.modes[i]]
    assert r5.mask.shape == (2, 8, 8) and r5.mask.dtype == torch.bool


def test_occlusion_mask_removes_observation_terms():
    gm = GenerativeModel.random([3], num_components=2, num_categories=1, image_size=8)
    s = sample(gm, 1, observe=True, seed=0)
    hidden = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    bu = {"image": torch.randn(1, 3, 8, 8) * 100}  # garbage everywhere...
    r = greedy_map(gm, bu, observed={"image": hidden})  # ... but nothing observed
    r0 = greedy_map(gm, {})
    for k in gm.sites:
        assert torch.equal(r.assignment[k], r0.assignment[k])
    # ... while observing the sample itself is informative: a different answer.
    r1 = greedy_map(gm, {"image": s.td["image"]})
    assert any(not torch.equal(r1.assignment[k], r0.assignment[k]) for k in gm.sites)


@pytest.mark.parametrize(
    "bu, match",
    [
        ({"image": torch.rand(2, 3, 7, 8)}, "shape"),
        ({"image": torch.full((1, 3, 8, 8), float("nan"))}, "NaN"),
        ({"image": torch.zeros(1, 3, 8, 8, dtype=torch.long)}, "floating"),
        ({"image": torch.rand(2, 3, 8, 8), "conv1_1": torch.rand(3, 3, 8, 8)}, "batch size"),
    ],
)
def test_bad_input_is_named(bu, match):
    gm = GenerativeModel.random([3], num_components=2, num_categories=2, image_size=8)
    with pytest.raises((ValueError, TypeError), match=match):
        greedy_map(gm, bu)


def test_bad_options_are_named():
    gm = GenerativeModel.random([3], num_components=2, num_categories=2, image_size=8)
    bu = {"image": torch.rand(1, 3, 8, 8)}
    with pytest.raises(ValueError, match="unknown category 'dog'"):
        greedy_map(gm, bu, category="dog")
    with pytest.raises(ValueError, match="unknown site"):
        greedy_map(gm, bu, clamp={"gamma_pool9": 0})
    with pytest.raises(ValueError, match="out of range"):
        greedy_map(gm, bu, clamp={"gamma_image": 5})
    with pytest.raises(ValueError, match="top_k"):
        greedy_map(gm, bu, top_k=0)
    with pytest.raises(ValueError, match="priors"):
        greedy_map(gm, bu, priors={"delta_conv1_1": CategoricalPrior(torch.ones(3))})


def test_large_k_is_chunked_and_unchanged():
    """K = 500 on the top level (as in the paper) with a small chunk bound."""
    gm = GenerativeModel.random([3, "M"], num_components={"image": 2, "conv1_1": 2, "pool1": 500},
                                num_categories=2, image_size=8)  # fmt: skip
    s = sample(gm, 2, observe=True, seed=0)
    a = greedy_map(gm, s.bu, top_k=3)
    b = greedy_map(gm, s.bu, top_k=3, chunk_elements=5000)
    assert all(torch.equal(a.assignment[k], b.assignment[k]) for k in gm.sites)
    torch.testing.assert_close(a.log_joint, b.log_joint)
    assert [m[0] for m in a.modes[0]] == [m[0] for m in b.modes[0]]


@pytest.mark.parametrize(
    "observed, match",
    [
        ({"image": torch.ones(1, 1, 1, 1, 8, 8, dtype=torch.bool)}, "must broadcast"),
        ({"image": torch.ones(3, 8, 9, dtype=torch.bool)}, "must broadcast"),
        ({"image": torch.ones(1, 3, 8, 8)}, "bool mask"),
        ({"pool7": torch.ones(1, dtype=torch.bool)}, "no level"),
    ],
)
def test_bad_masks_are_named(observed, match):
    gm = GenerativeModel.random([3], num_components=2, num_categories=2, image_size=8)
    with pytest.raises((ValueError, TypeError), match=match):
        greedy_map(gm, {"image": torch.rand(2, 3, 8, 8)}, observed=observed)


@pytest.mark.parametrize(
    "category, match",
    [
        (torch.tensor([[0], [1]]), "0-D or"),
        (1.7, "category must be"),
        ([0, 1.5], "int indices"),
        ([True, False], "int indices"),
        ([0, 1, 1], "3 entries for 2 images"),
        (5, "out of range"),
    ],
)
def test_bad_category_inputs_are_named(category, match):
    gm = GenerativeModel.random([3], num_components=2, num_categories=2, image_size=8)
    with pytest.raises((ValueError, TypeError), match=match):
        greedy_map(gm, {"image": torch.rand(2, 3, 8, 8)}, category=category)


def test_category_forms_agree():
    import numpy as np

    gm = GenerativeModel.random([3], num_components=2, num_categories=2, image_size=8)
    bu = {"image": torch.rand(2, 3, 8, 8)}
    forms = ["c1", 1, np.int64(1), torch.tensor(1), ["c1", 1], torch.tensor([1, 1])]
    for form in forms:
        assert greedy_map(gm, bu, category=form).assignment["category"].tolist() == [1, 1]


def test_empty_batch_and_bad_scale_are_named():
    gm = GenerativeModel.random([3], num_components=2, num_categories=2, image_size=8)
    with pytest.raises(ValueError, match="batch size 0"):
        greedy_map(gm, {"image": torch.zeros(0, 3, 8, 8)})
    with pytest.raises(ValueError, match="scale_td"):
        GenerativeModel.random([3], num_components=2, image_size=8, scale_td=0.0)
    with pytest.raises(ValueError, match="top_k"):
        greedy_map(gm, {"image": torch.rand(1, 3, 8, 8)}, top_k=True)


def test_category_evidence_against_brute_force_when_batch_equals_categories():
    """B == N: a transposed category term would go unnoticed anywhere else."""
    from scipy import stats

    gm = one_level_model(seed=1)
    s = sample(gm, 3, observe=True, seed=4)
    evidence = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.0, 0.2, 0.9]])
    bu = {"image": s.bu["image"], "category": evidence}
    result = greedy_map(gm, bu)
    obs = gm.observations["category"]
    lam, beta = float(obs.threshold), float(obs.background)
    s1, s2 = obs.scale_on.flatten().tolist(), float(obs.scale_off)
    prior_c = gm.priors["category"].log_probs()
    prior_g = gm.priors["gamma_image"].log_probs()
    prior_d = gm.priors["delta_image"].log_probs()
    for i in range(3):
        best, arg = -float("inf"), None
        for c in range(3):
            # log P(bu_category | one-hot(c)) by scipy, element by element.
            cat = sum(
                stats.norm.logpdf(float(evidence[i, j]), 1.0, s1[j])
                if (1.0 if j == c else 0.0) >= lam
                else stats.norm.logpdf(float(evidence[i, j]), beta, s2)
                for j in range(3)
            )
            (g, d), score = brute_force_level(
                gm,
                "image",
                c,
                s.bu["image"][i],
                lambda g, d, c=c, cat=cat: prior_c[c] + prior_g[c, g] + prior_d[d] + cat,
            )
            if score > best:
                best, arg = score, (c, g, d)
        got = tuple(
            int(result.assignment[k][i]) for k in ("category", "gamma_image", "delta_image")
        )
        assert got == arg
        assert result.log_joint[i].item() == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize(
    "cfg, occluded",
    [([3, "M"], False), ([3, "M"], True), ([2, "M", 3, "M"], True)],
    ids=["one-offset-levels", "occluded", "pool-level-below-top"],
)
def test_greedy_log_joint_is_log_joint_of_its_assignment_to_the_bit(cfg, occluded):
    """Both ways down (all components' closed form at once on one-offset levels, scoring then
    recomputing the winner on pool levels) report exactly ``log_joint(assignment)``."""
    gm = GenerativeModel.random(cfg, num_components=3, num_categories=2, image_size=8)
    s = sample(gm, 4, observe=True, seed=2)
    observed = None
    if occluded:
        observed = {
            "image": torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.3
        }
    r = greedy_map(gm, s.bu, observed=observed)
    assert torch.equal(r.log_joint, log_joint(gm, s.bu, r.assignment, observed=observed).detach())


def test_cached_closed_form_constants_follow_in_place_edits():
    """Observation.constants is cached; editing a buffer in place must give fresh constants."""
    gm = GenerativeModel.random([3, "M"], num_components=2, num_categories=2, image_size=8)
    s = sample(gm, 3, observe=True, seed=4)
    before = greedy_map(gm, s.bu)
    with torch.no_grad():
        for obs in gm.observations.values():
            obs.threshold.fill_(0.9)
            obs.scale_on.mul_(1.5)
    after = greedy_map(gm, s.bu)
    # Same answer as the uncached path (log_joint builds its constants afresh every call).
    torch.testing.assert_close(after.log_joint, log_joint(gm, s.bu, after.assignment).detach())
    assert not torch.equal(before.log_joint, after.log_joint)


def test_kept_template_planes_follow_edits_and_match_the_uncached_path():
    """The top level's shifted templates are kept between calls: an in-place edit of the
    templates must reach the next call, and the kept path must agree with the plain one."""
    gm = GenerativeModel.random([3, "M"], num_components=2, num_categories=2, image_size=8)
    s = sample(gm, 4, observe=True, seed=6)
    greedy_map(gm, s.bu)  # keeps the planes
    with torch.no_grad():
        gm.steps[gm.hidden_levels[-1]].weight.mul_(-1.0)  # other templates entirely
    kept = greedy_map(gm, s.bu)
    plain = greedy_map(gm, s.bu, chunk_elements=64)  # too small to keep: the image-shift path
    for site in gm.sites:
        assert torch.equal(kept.assignment[site], plain.assignment[site]), site
    assert torch.equal(kept.log_joint, log_joint(gm, s.bu, kept.assignment).detach())
    torch.testing.assert_close(kept.log_joint, plain.log_joint)


def test_unobserved_levels_and_values_keep_log_joint_exact():
    """A level missing from bu, and huge values under an occlusion mask, change nothing that
    should not change: the answer ignores the masked values, log_joint agrees to the bit."""
    gm = GenerativeModel.random([3, "M"], num_components=3, num_categories=2, image_size=8)
    s = sample(gm, 4, observe=True, seed=3)
    bu = {n: x for n, x in s.bu.items() if n != "conv1_1"}
    observed = {"image": torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5}
    r = greedy_map(gm, bu, observed=observed)
    assert torch.equal(r.log_joint, log_joint(gm, bu, r.assignment, observed=observed).detach())
    huge = dict(bu, image=torch.where(observed["image"], bu["image"], 1e30))
    r2 = greedy_map(gm, huge, observed=observed)
    for site in gm.sites:
        assert torch.equal(r.assignment[site], r2.assignment[site]), site
    torch.testing.assert_close(r2.log_joint, r.log_joint, rtol=0, atol=0)


@pytest.mark.parametrize(
    "cfg, size, chunk",
    [([3, "M", 4], 8, 50), ([20, "M", 3, "M"], 12, 2**25), ([2, 3, "M", 4, "M"], 10, 300)],
    ids=["unpool-phase-tiny-chunks", "unpool-transposed-two-pools", "two-convs-small-chunks"],
)  # fmt: skip
def test_every_level_shape_is_the_brute_force_argmax_in_blocks(cfg, size, chunk):
    """Blocked scoring of every kind of level (conv and image levels with one offset, pools
    with nine, the top with 25) picks the plain per-hypothesis argmax, and greedy's log_joint
    is log_joint of its assignment."""
    gm = GenerativeModel.random(cfg, num_components=3, num_categories=2, image_size=size, seed=5)
    s = sample(gm, 3, observe=True, seed=6)
    r = greedy_map(gm, s.bu, chunk_elements=chunk)
    _assert_each_level_is_the_brute_force_argmax(gm, s.bu, r, 3)
    torch.testing.assert_close(r.log_joint, log_joint(gm, s.bu, r.assignment).detach(),
                               rtol=1e-5, atol=0)  # fmt: skip


def test_top_k_completions_are_made_a_group_at_a_time(monkeypatch):
    # Peak memory of top_k > 1 stays near top_k = 1's: the descent never holds B·k rows; the
    # answers are those of completing all k at once.
    from pyro_backpass.inference import greedy as greedy_module

    gm = GenerativeModel.random([4, "M", 4, "M"], num_components=3, num_categories=2,
                                image_size=16)  # fmt: skip
    s = sample(gm, 3, observe=True, seed=4)
    monkeypatch.setattr(greedy_module, "DESCENT_ELEMENTS", 2**40)
    whole = greedy_map(gm, s.bu, top_k=40, clamp={"gamma_pool2": 1})
    rows = []
    real = greedy_module.descend

    def spy(gm, values, **kw):
        rows.append(values["category"].shape[0])
        return real(gm, values, **kw)

    monkeypatch.setattr(greedy_module, "descend", spy)
    monkeypatch.setattr(greedy_module, "DESCENT_ELEMENTS", 1)
    grouped = greedy_map(gm, s.bu, top_k=40, clamp={"gamma_pool2": 1})
    assert max(rows) == 3 and sum(rows) == 3 * 40  # one rank (B rows) at a time
    assert grouped.modes == whole.modes
    for site in gm.sites:
        assert torch.equal(grouped.assignment[site], whole.assignment[site])
    torch.testing.assert_close(grouped.log_joint, whole.log_joint, rtol=0, atol=0)
    for name in whole.td:
        torch.testing.assert_close(grouped.td[name], whole.td[name], rtol=0, atol=0)
    assert torch.equal(grouped.mask, whole.mask)


def test_per_channel_background_is_the_brute_force_argmax_at_every_level():
    """β and σ2 one per channel (fit_background): greedy still takes the per-hypothesis
    argmax of every level, and its log-joint is log_joint of its assignment."""
    gm = GenerativeModel.random([3, "M", 4], num_components=3, num_categories=2, image_size=8)
    g = torch.Generator().manual_seed(5)
    for obs in gm.observations.values():
        if obs.spec.name == "category":
            continue
        obs.per_channel_background()
        c = obs.spec.channels
        obs.background.copy_(0.5 * torch.rand(c, 1, 1, generator=g))
        obs.scale_off.copy_(0.2 + torch.rand(c, 1, 1, generator=g))
    s = sample(gm, 3, observe=True, seed=4)
    r = greedy_map(gm, s.bu)
    _assert_each_level_is_the_brute_force_argmax(gm, s.bu, r, 3)
    torch.testing.assert_close(r.log_joint, log_joint(gm, s.bu, r.assignment), rtol=1e-5, atol=0)


@pytest.mark.parametrize("size", [8, 9], ids=["even", "odd"])
def test_unpool_level_scored_by_phases_equals_the_per_hypothesis_sum(size):
    """An unpool level with few input channels is scored phase by phase, without interleaving
    φ of every component: each γ's score is still the plain closed form's sum over the level
    (odd sizes and an occlusion mask on that level included), and greedy's log_joint is still
    log_joint of its assignment to the bit."""
    gm = GenerativeModel.random([3, "M"], num_components=3, num_categories=2, image_size=size)
    step, name = gm.steps["conv1_1"], "conv1_1"
    assert step.by_phases and step.num_offsets == 1
    s = sample(gm, 3, observe=True, seed=7)
    g = torch.Generator().manual_seed(2)
    observed = {name: torch.rand(3, 1, size, size, generator=g) > 0.3}
    upper = torch.rand(3, *step.upper.shape, generator=g)
    with torch.no_grad():
        scores, _ = level_scores(gm, name, upper, s.bu, observed, chunk_elements=2**25,
                                 constants=gm.constants(name))  # fmt: skip
    obs = gm.observations[name]
    for i in range(3):
        for k in range(step.num_components):
            _, want = closed_form_td(
                s.bu[name][i], phi_loop(step, upper[i], k, 0), threshold=obs.threshold,
                background=obs.background, scale_td=step.scale_td, scale_on=obs.scale_on,
                scale_off=obs.scale_off, observed=observed[name][i],
            )  # fmt: skip
            torch.testing.assert_close(scores[i, k, 0], want.sum(), rtol=1e-5, atol=1e-3)
    r = greedy_map(gm, s.bu, observed=observed)
    assert torch.equal(r.log_joint, log_joint(gm, s.bu, r.assignment, observed=observed).detach())
