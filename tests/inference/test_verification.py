"""The verified backward pass (issue #10): descent features against independent computations
(the objective, the background score, the backbone on hand-masked images, block means), the
choice against brute force over the descents, the verifier's file and errors, and the fit
against scipy's optimiser on the same objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from pyro_backpass import (
    DescentVerifier,
    GenerativeModel,
    fit_descent_verifier,
    greedy_map,
    log_joint,
    refine_mask,
    verified_map,
)
from pyro_backpass.inference import (
    background_log_likelihood,
    check_verifier,
    default_verifier,
    descent_features,
    expected_iou,
)
from pyro_backpass.learning import VerifierExample, listwise_loss

pytestmark = pytest.mark.usefixtures("one_thread")
K = 4


@pytest.fixture(scope="module")
def case(airplane_scene):
    gm, scene, bu = airplane_scene
    result = greedy_map(gm, bu, category="airplane", top_k=K)
    modes = result.modes[0]
    values = {s: torch.tensor([a[s] for a, _ in modes]) for s in result.assignment}
    lj = torch.tensor([v for _, v in modes], dtype=torch.float64)
    x, masks = descent_features(gm, bu, values, lj)
    return gm, scene, bu, modes, x, masks


def _verifier(gm, x, column: int, sign: float) -> DescentVerifier:
    n, f = len(gm.categories), x.shape[1]
    weight = torch.zeros(n, f, dtype=torch.float64)
    weight[0, column] = sign
    return DescentVerifier(categories=gm.categories, read_levels=("pool3", "conv4_1", "pool4"),
                           weight=weight, mean=torch.zeros(n, f), scale=torch.ones(n, f),
                           fitted=torch.tensor([True] + [False] * (n - 1)), top_k=K)  # fmt: skip


def test_model_features_sum_to_the_log_likelihood_ratio(case):
    gm, _, bu, modes, x, masks = case
    n_levels = len(gm.hidden_levels)
    bg = float(background_log_likelihood(gm, bu)[0])
    for j, (assignment, _) in enumerate(modes):
        oracle = float(log_joint(gm, bu, assignment).detach()[0]) - bg
        assert float(x[j, : n_levels + 1].sum()) == pytest.approx(oracle, rel=1e-4, abs=0.5)
        clamped = greedy_map(gm, bu, clamp=assignment)
        assert torch.equal(clamped.mask[0], masks[j])
        assert float(x[j, n_levels + 1]) == pytest.approx(np.log1p(float(masks[j].sum())))


def test_llr_columns_are_the_levels_top_first(case):
    """Metamorphic: brightening the image level changes, among the model's columns, only the
    last LLR column (the image level's); the prior column and every upper level's stay."""
    gm, _, bu, modes, x, _ = case
    n_levels = len(gm.hidden_levels)
    values = {s: torch.tensor([a[s] for a, _ in modes]) for s in modes[0][0]}
    lj = torch.tensor([v for _, v in modes], dtype=torch.float64)
    brighter = dict(bu, image=(bu["image"] * 0.5 + 0.25))
    lj2 = torch.stack([log_joint(gm, brighter, a).detach()[0] for a, _ in modes]).double()
    lj2 = lj + (lj2 - torch.stack([log_joint(gm, bu, a).detach()[0] for a, _ in modes]).double())
    x2, _ = descent_features(gm, brighter, values, lj2)
    assert torch.allclose(x2[:, : n_levels - 1], x[:, : n_levels - 1])
    assert not torch.allclose(x2[:, n_levels - 1], x[:, n_levels - 1])
    assert torch.allclose(x2[:, n_levels], x[:, n_levels], rtol=1e-4, atol=0.5)  # the prior


def test_unobserved_pixels_are_not_shown(case):
    """With the image level unobserved everywhere, every descent's region is empty: its
    backbone features are those of the image's fill alone (an all-False mask)."""
    gm, scene, bu, modes, x, masks = case
    n_levels, n_cat = len(gm.hidden_levels), len(gm.categories)
    values = {s: torch.tensor([a[s] for a, _ in modes]) for s in modes[0][0]}
    lj = torch.tensor([v for _, v in modes], dtype=torch.float64)
    hidden = {"image": torch.zeros(1, 1, 64, 64, dtype=torch.bool)}
    x2, _ = descent_features(gm, bu, values, lj, observed=hidden)
    image = scene.image.numpy()
    fill = np.percentile(image.reshape(3, -1), 50, axis=1, method="lower")
    blank = torch.from_numpy(np.broadcast_to(fill[:, None, None], image.shape).copy()).float()
    with torch.no_grad():
        logp = torch.log_softmax(gm.backbone.logits(gm.backbone(blank[None])), -1)[0]
    start = n_levels + 2
    for j in range(K):
        assert torch.allclose(x2[j, start : start + n_cat].double(), logp.double(), atol=1e-4)
    assert torch.allclose(x2[:, -64:], torch.zeros_like(x2[:, -64:]))  # nothing seen under it


def test_backbone_features_match_hand_masked_images(case):
    gm, scene, bu, _, x, masks = case
    n_levels, n_cat = len(gm.hidden_levels), len(gm.categories)
    image = scene.image.numpy()
    fill = np.percentile(image.reshape(3, -1), 50, axis=1, method="lower")  # lower median
    for j in range(K):
        m = masks[j].numpy()
        shown = np.where(m[None], image, fill[:, None, None]).astype(np.float32)
        with torch.no_grad():
            acts = gm.backbone(torch.from_numpy(shown)[None])
        logp = torch.log_softmax(gm.backbone.logits(acts), -1)[0]
        start = n_levels + 2
        assert torch.allclose(x[j, start : start + n_cat].double(), logp.double(), atol=1e-4)
        seen = torch.cat([acts[n].mean((2, 3))[0] for n in ("pool3", "conv4_1", "pool4")])
        got = x[j, start + n_cat : start + n_cat + 192].double()
        assert torch.allclose(got, seen.double(), atol=1e-4)
        # pool4 is 4×4 on a 64-px image: each element's weight is the mask's share of its
        # 16×16 block; the feature is the weighted mean of the scene's activations.
        w = m.reshape(4, 16, 4, 16).mean((1, 3))
        a = bu["pool4"][0].numpy()
        oracle = (a * w).sum((1, 2)) / max(w.sum(), 1e-3)
        assert np.allclose(x[j, -64:].numpy(), oracle, atol=1e-4)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_verified_map_keeps_the_descent_the_verifier_scores_highest(case, sign):
    gm, _, bu, modes, x, masks = case
    area_column = len(gm.hidden_levels) + 1
    verifier = _verifier(gm, x, area_column, sign)
    result = verified_map(gm, bu, category="airplane", verifier=verifier)
    areas = [sign * float(m.sum()) for m in masks]
    best = max(range(K), key=lambda j: (areas[j], -j))  # brute force over the K descents
    for site, v in modes[best][0].items():
        assert int(result.assignment[site][0]) == v, site
    assert torch.equal(result.mask[0], masks[best])
    oracle = float(log_joint(gm, bu, modes[best][0]).detach()[0])
    assert float(result.log_joint[0]) == pytest.approx(oracle, rel=1e-5)
    ranked = [sign * float(m.sum()) for m in masks]
    order = [next(j for j, (a, _) in enumerate(modes) if a == mode[0]) for mode in result.modes[0]]
    assert [ranked[j] for j in order] == sorted(ranked, reverse=True)


def test_refined_features_read_the_crf_masks_of_the_descents(case):
    """``refine=True``: each descent's mask is ``refine_mask`` of that descent's own pass; the
    model's columns do not change, and the area column is the refined mask's."""
    gm, scene, bu, modes, x, _ = case
    n_levels = len(gm.hidden_levels)
    values = {s: torch.tensor([a[s] for a, _ in modes]) for s in modes[0][0]}
    lj = torch.tensor([v for _, v in modes], dtype=torch.float64)
    x2, masks2 = descent_features(gm, bu, values, lj, refine=True)
    for j, (assignment, _) in enumerate(modes):
        clamped = greedy_map(gm, bu, clamp=assignment)
        assert torch.equal(masks2[j], refine_mask(gm, clamped, bu, scene.image)[0])
        assert float(x2[j, n_levels + 1]) == pytest.approx(np.log1p(float(masks2[j].sum())))
    assert torch.equal(x2[:, : n_levels + 1], x[:, : n_levels + 1])


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_verifier_of_refined_masks_chooses_by_them(case, sign, tmp_path):
    gm, scene, bu, modes, x, _ = case
    area_column = len(gm.hidden_levels) + 1
    plain = _verifier(gm, x, area_column, sign)
    verifier = DescentVerifier(categories=gm.categories, read_levels=plain.read_levels,
                               weight=plain.weight, mean=plain.mean, scale=plain.scale,
                               fitted=plain.fitted, top_k=K, refine_masks=True)  # fmt: skip
    back = DescentVerifier.load(verifier.save(tmp_path / "v.safetensors"))
    assert back.refine_masks and back.fingerprint() == verifier.fingerprint()
    assert "refine_masks" not in plain.config() and verifier.fingerprint() != plain.fingerprint()
    assert not plain.same_setup(verifier)
    result = verified_map(gm, bu, category="airplane", verifier=back)
    refined = [refine_mask(gm, greedy_map(gm, bu, clamp=a), bu, scene.image)[0] for a, _ in modes]
    best = max(range(K), key=lambda j: (sign * float(refined[j].sum()), -j))  # brute force
    for site, v in modes[best][0].items():
        assert int(result.assignment[site][0]) == v, site
    assert torch.equal(refine_mask(gm, result, bu, scene.image)[0], refined[best])


def test_expected_iou_matches_a_loop_over_pixel_sets():
    gen = torch.Generator().manual_seed(3)
    masks = torch.rand(5, 6, 7, generator=gen) > 0.6
    masks[3] = False  # an empty mask: IoU 1 with itself, 0 with the others
    masks[4] = masks[0]
    weights = torch.softmax(torch.randn(5, generator=gen, dtype=torch.float64), 0)
    sets = [set(map(tuple, m.nonzero().tolist())) for m in masks]

    def iou(a: set, b: set) -> float:
        return 1.0 if not a | b else len(a & b) / len(a | b)

    oracle = [sum(float(weights[i]) * iou(sets[i], sets[j]) for i in range(5)) for j in range(5)]
    assert np.allclose(expected_iou(masks, weights).numpy(), oracle, atol=1e-12)
    with pytest.raises(ValueError, match="masks must be"):
        expected_iou(masks, weights[:3])


def _highest_expected_iou(p, masks) -> int:
    """Brute force over pixel sets: the first mask of highest Σ_i p_i IoU(mask_i, mask_j)."""
    sets = [set(map(tuple, m.nonzero().tolist())) for m in masks]
    risk = [sum(p[i] * len(sets[i] & sets[j]) / max(len(sets[i] | sets[j]), 1) for i in range(K))
            for j in range(K)]  # fmt: skip
    return max(range(K), key=lambda j: (risk[j], -j))


@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_a_consensus_verifier_chooses_the_highest_expected_iou(case, temperature, tmp_path):
    gm, _, bu, modes, x, masks = case
    area_column = len(gm.hidden_levels) + 1
    verifier = _verifier(gm, x, area_column, 1.0).with_consensus(temperature)
    back = DescentVerifier.load(verifier.save(tmp_path / "v.safetensors"))
    assert back.consensus == temperature and back.fingerprint() == verifier.fingerprint()
    result = verified_map(gm, bu, category="airplane", verifier=back)
    # Brute force: the scores are the area column (mean 0, scale 1, weight 1).
    p = np.exp(x[:, area_column].double().numpy() / temperature)
    p /= p.sum()
    best = _highest_expected_iou(p, masks)
    for site, v in modes[best][0].items():
        assert int(result.assignment[site][0]) == v, site
    with pytest.raises(ValueError, match="finite temperature > 0"):
        verifier.with_consensus(0.0)
    with pytest.raises(TypeError, match="consensus must be"):
        verifier.with_consensus(True)
    assert (
        verifier.with_consensus(None).fingerprint()
        == _verifier(gm, x, area_column, 1.0).fingerprint()
    )


def test_the_shipped_refined_verifier_chooses_by_consensus_of_refined_masks(case):
    gm, scene, bu, modes, _, _ = case
    verifier = DescentVerifier.shipped(refined=True)
    assert verifier.refine_masks and verifier.consensus > 0
    assert verifier.fitted_categories == ("airplane",)
    check_verifier(gm, verifier)  # fitted for the shipped model
    result = verified_map(gm, bu, category="airplane", verifier=verifier, top_k=K)
    refined = [refine_mask(gm, greedy_map(gm, bu, clamp=a), bu, scene.image)[0] for a, _ in modes]
    values = {s: torch.tensor([a[s] for a, _ in modes]) for s in modes[0][0]}
    lj = torch.tensor([v for _, v in modes], dtype=torch.float64)
    x, _ = descent_features(gm, bu, values, lj, refine=True)
    p = torch.softmax(verifier.score(x, 0) / verifier.consensus, 0).numpy()
    best = _highest_expected_iou(p, refined)
    for site, v in modes[best][0].items():
        assert int(result.assignment[site][0]) == v, site
    with pytest.raises(ValueError, match="first stage"):
        DescentVerifier.shipped(lower=True, refined=True)


def test_fit_records_and_checks_refined_examples():
    gm = GenerativeModel.random([4, "M"], num_components=2, num_categories=2)
    hits = torch.tensor([True, False, False])
    ex = [VerifierExample(category=1, features=torch.randn(3, 2, dtype=torch.float64),
                          hits=hits, iou=hits.double(), refine=True) for _ in range(2)]  # fmt: skip
    assert fit_descent_verifier(gm, examples=ex, top_k=3).refine_masks
    with pytest.raises(ValueError, match="refine=False but the examples were made with"):
        fit_descent_verifier(gm, examples=ex, top_k=3, refine=False)
    mixed = [ex[0], VerifierExample(category=1, features=ex[1].features, hits=hits,
                                    iou=hits.double())]  # fmt: skip
    with pytest.raises(ValueError, match="mix CRF-refined masks"):
        fit_descent_verifier(gm, examples=mixed, top_k=3)


def test_verifier_file_round_trip_and_errors(case, tmp_path):
    gm, _, bu, _, x, _ = case
    v = _verifier(gm, x, 3, 1.0)
    path = v.save(tmp_path / "v.safetensors")
    back = DescentVerifier.load(path)
    assert torch.equal(back.weight, v.weight) and torch.equal(back.fitted, v.fitted)
    assert back.read_levels == v.read_levels and back.top_k == v.top_k
    assert torch.allclose(back.score(x, 0), v.score(x, 0))
    with pytest.raises(ValueError, match="no weights for 'bird'"):
        v.score(x, 1)
    with pytest.raises(ValueError, match="features must be"):
        v.score(x[:, :-1], 0)
    with pytest.raises(ValueError, match="needs a category"):
        verified_map(gm, bu, category=None, verifier=v)
    gm.save(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not a pyro_backpass DescentVerifier"):
        DescentVerifier.load(tmp_path / "model.safetensors")
    other = GenerativeModel.random([4, "M"], num_components=2, num_categories=2)
    with pytest.raises(ValueError, match="no descent verifier was fitted for this model"):
        default_verifier(other)
    assert default_verifier(gm).num_features == x.shape[1]  # the shipped one fits this model
    stale = DescentVerifier(categories=gm.categories, read_levels=v.read_levels, weight=v.weight,
                            mean=v.mean, scale=v.scale, fitted=v.fitted, top_k=K,
                            model_sha256="0" * 64)  # fmt: skip
    with pytest.raises(ValueError, match="fitted for another model or backbone"):
        verified_map(gm, bu, category="airplane", verifier=stale)
    with pytest.raises(ValueError, match="no weights for 'bird'"):
        verified_map(gm, bu, category="bird", verifier=v)
    with pytest.raises(ValueError, match="top_k must be"):
        verified_map(gm, bu, category="airplane", verifier=v, top_k=1)
    with pytest.raises(ValueError, match="top_k must be"):
        DescentVerifier(categories=["a"], read_levels=[], weight=torch.zeros(1, 2),
                        mean=torch.zeros(1, 2), scale=torch.ones(1, 2),
                        fitted=torch.ones(1, dtype=torch.bool), top_k=1)  # fmt: skip


def test_fit_matches_scipy_on_the_same_objective():
    gen = torch.Generator().manual_seed(0)
    gm = GenerativeModel.random([4, "M"], num_components=2, num_categories=2)
    examples = []
    for i in range(6):
        feats = torch.randn(5, 3, generator=gen, dtype=torch.float64)
        hits = torch.zeros(5, dtype=torch.bool)
        hits[i % 5] = True
        feats[hits, 0] += 1.5  # the first feature is informative, the others noise
        examples.append(VerifierExample(category=1, features=feats, hits=hits,
                                        iou=hits.double()))  # fmt: skip
    fit = fit_descent_verifier(gm, examples=examples, top_k=5, l2=2.0)
    assert fit.fitted.tolist() == [False, True]
    mean, scale = fit.mean[1], fit.scale[1]
    allx = torch.cat([e.features for e in examples])
    assert torch.allclose(mean, allx.mean(0)) and torch.allclose(scale, allx.std(0))

    def objective(w: np.ndarray) -> float:
        t = torch.from_numpy(w)
        return float(listwise_loss(t, examples, mean=mean, scale=scale, l2=2.0))

    oracle = minimize(objective, np.zeros(3), method="Nelder-Mead",
                      options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 20000})  # fmt: skip
    assert np.allclose(fit.weight[1].numpy(), oracle.x, atol=1e-3)
    assert float(fit.weight[1, 0]) > 0  # the informative feature is weighted up


def _ensemble_verifier(seed: int = 0, *, n: int = 2, f: int = 3, e: int = 2, h: int = 4,
                       nonlinear=None):  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    if nonlinear is None:
        nonlinear = [False, True] + [False] * (n - 2)
    nonlinear = torch.tensor(nonlinear)
    return DescentVerifier(
        categories=[f"c{i}" for i in range(n)], read_levels=("pool4",),
        weight=torch.randn(n, f, generator=gen, dtype=torch.float64),
        mean=torch.randn(n, f, generator=gen, dtype=torch.float64),
        scale=torch.rand(n, f, generator=gen, dtype=torch.float64) + 0.5,
        fitted=torch.ones(n, dtype=torch.bool), top_k=5,
        hidden_weight=torch.randn(n, e, f, h, generator=gen, dtype=torch.float64),
        hidden_bias=torch.randn(n, e, h, generator=gen, dtype=torch.float64),
        out_weight=torch.randn(n, e, h, generator=gen, dtype=torch.float64),
        nonlinear=nonlinear,
    )  # fmt: skip


def test_ensemble_scores_are_the_mean_of_its_networks(tmp_path):
    """Against numpy, network by network; the file round trip keeps scores and fingerprint;
    a linear-only verifier is still written as format version 1."""
    v = _ensemble_verifier()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = ((x - v.mean[1]) / v.scale[1]).numpy()
    nets = [np.maximum(z @ v.hidden_weight[1, e].numpy() + v.hidden_bias[1, e].numpy(), 0.0)
            @ v.out_weight[1, e].numpy() for e in range(2)]  # fmt: skip
    assert np.allclose(v.score(x, 1).numpy(), np.mean(nets, 0))
    linear = ((x - v.mean[0]) / v.scale[0]) @ v.weight[0]  # category 0 stays linear
    assert torch.allclose(v.score(x, 0), linear)
    back = DescentVerifier.load(v.save(tmp_path / "v.safetensors"))
    assert back.fingerprint() == v.fingerprint() and torch.equal(back.score(x, 1), v.score(x, 1))
    assert back.config()["format_version"] == 2 and back.config()["hidden"] == 4
    assert "nonlinear=['c1']" in repr(back)
    plain = DescentVerifier(categories=v.categories, read_levels=v.read_levels, weight=v.weight,
                            mean=v.mean, scale=v.scale, fitted=v.fitted, top_k=5)  # fmt: skip
    assert plain.config()["format_version"] == 1 and "hidden" not in plain.config()


def test_with_category_takes_one_categorys_scoring():
    """A linear verifier given category 1 of an ensemble verifier scores 1 as the ensemble
    does and 0 as before; given a linear category back, no ensemble is left."""
    ens = _ensemble_verifier(seed=2)
    lin = DescentVerifier(categories=ens.categories, read_levels=ens.read_levels,
                          weight=torch.ones(2, 3), mean=torch.zeros(2, 3), scale=torch.ones(2, 3),
                          fitted=torch.tensor([True, False]), top_k=5)  # fmt: skip
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    merged = lin.with_category(ens, "c1")
    assert torch.equal(merged.score(x, 1), ens.score(x, 1))
    assert torch.equal(merged.score(x, 0), lin.score(x, 0))
    assert merged.fitted.tolist() == [True, True] and merged.nonlinear.tolist() == [False, True]
    back = merged.with_category(lin.with_category(ens, 0), 1)  # c1 linear from a verifier...
    assert not bool(back.nonlinear[1])  # ...whose c1 is linear (lin's, unfitted there)
    other = DescentVerifier(categories=ens.categories, read_levels=ens.read_levels,
                            weight=torch.ones(2, 3), mean=torch.zeros(2, 3),
                            scale=torch.ones(2, 3), fitted=torch.tensor([True, True]),
                            top_k=7)  # fmt: skip
    with pytest.raises(ValueError, match="differ in config"):
        lin.with_category(other, 0)
    with pytest.raises(ValueError, match="unknown category 'c9'"):
        lin.with_category(ens, "c9")
    with pytest.raises(ValueError, match="out of range"):
        lin.with_category(ens, 2)
    # An ensemble of another size replaces this verifier's only ensemble...
    small = _ensemble_verifier(seed=4, e=1, h=2)
    swapped = ens.with_category(small, 1)
    assert swapped.hidden_weight.shape[1:] == (1, 3, 2)
    assert torch.equal(swapped.score(x, 1), small.score(x, 1))
    # ...but not one it keeps for another category.
    both = _ensemble_verifier(seed=5, n=3, nonlinear=[True, True, False])
    with pytest.raises(ValueError, match="differ in size"):
        both.with_category(_ensemble_verifier(seed=7, n=3, e=1, h=2), 1)
    # Linear again: no ensemble weights are left to enter the fingerprint.
    relinear = both.with_category(
        lin3 := DescentVerifier(
            categories=both.categories,
            read_levels=both.read_levels,
            weight=torch.ones(3, 3),
            mean=torch.zeros(3, 3),
            scale=torch.ones(3, 3),
            fitted=torch.ones(3, dtype=torch.bool),
            top_k=5,
        ),
        1,
    )
    assert relinear.nonlinear.tolist() == [True, False, False]
    assert not bool(relinear.hidden_weight[1].any()) and bool(relinear.hidden_weight[0].any())
    assert torch.equal(relinear.score(x, 1), lin3.score(x, 1))


def test_ensemble_fit_learns_what_a_linear_score_cannot():
    """Lists whose hit is the descent with the largest |x0| (a non-monotone rule; x0 has zero
    mean): the linear verifier's choice is near chance on held-out lists, the ensemble's near
    perfect (brute-force counting of the chosen descents' hits)."""
    gen = torch.Generator().manual_seed(0)
    gm = GenerativeModel.random([4, "M"], num_components=2, num_categories=2)

    def lists(m: int) -> list[VerifierExample]:
        out = []
        for _ in range(m):
            feats = torch.randn(8, 3, generator=gen, dtype=torch.float64)
            hits = feats[:, 0].abs() == feats[:, 0].abs().max()
            out.append(VerifierExample(category=0, features=feats, hits=hits,
                                       iou=hits.double()))  # fmt: skip
        return out

    train, test = lists(400), lists(200)
    rng_before = torch.get_rng_state()
    ens = fit_descent_verifier(gm, examples=train, top_k=8, hidden=16, ensemble=2, epochs=30)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random state kept
    # The order the examples come in (workers, caches) does not change the fit (on fewer).
    few = [fit_descent_verifier(gm, examples=e, top_k=8, hidden=16, ensemble=2, epochs=10)
           for e in (train[:60], train[:60][::-1])]  # fmt: skip
    assert few[0].fingerprint() == few[1].fingerprint()
    lin = fit_descent_verifier(gm, examples=train, top_k=8, l2=1.0)

    def rate(v):
        return np.mean([bool(e.hits[int(v.score(e.features, 0).argmax())]) for e in test])

    assert ens.nonlinear.tolist() == [True, False] and not bool(lin.nonlinear.any())
    assert rate(ens) >= 0.85 and rate(lin) <= 0.45
    with pytest.raises(ValueError, match="hidden must be"):
        fit_descent_verifier(gm, examples=train, top_k=8, hidden=-1)
