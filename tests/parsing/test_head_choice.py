"""``HeadChoice``: its features by hand, its fit against scipy's optimiser on the same
objective, what it learns on heads where one feature tells the hit, its checks, and the parse
that uses it (``run_parse(..., choose=)``) against ``greedy_map``'s own modes."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from pyro_backpass import GenerativeModel, HeadChoice, greedy_map, make_scene, split_seed
from pyro_backpass.inference import crf_mask, object_mask, top_down_pass
from pyro_backpass.parsing import fit_head_choice, head_features, model_fingerprint, run_parse
from pyro_backpass.parsing.head_choice import HEAD_POOL

CATS = ("airplane", "bird", "boat")


def _head(category: str, *, llr=-100.0, visible=50.0, amodal=80.0, clp=None, hit=False):
    clp = {c: -2.0 for c in CATS} if clp is None else clp
    return {"category": category, "llr": llr, "visible": visible, "amodal": amodal,
            "class_log_probs": clp, "hit": hit}  # fmt: skip


def test_features_by_hand():
    x = head_features(llr=-120.0, visible=49.0, amodal=60.0, category="bird", categories=CATS,
                      class_log_probs={"airplane": -0.5, "bird": -1.5, "boat": -3.0})  # fmt: skip
    assert x == pytest.approx([-2.0, math.log(50.0), -1.5, -1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="unknown category 'car'"):
        head_features(llr=0, visible=1, amodal=1, category="car", categories=CATS,
                      class_log_probs=dict.fromkeys(CATS, 0.0))  # fmt: skip
    with pytest.raises(ValueError, match="lacks the categories"):
        head_features(llr=0, visible=1, amodal=1, category="bird", categories=CATS,
                      class_log_probs={"bird": 0.0})  # fmt: skip
    with pytest.raises(ValueError, match="finite"):
        head_features(llr=math.nan, visible=1, amodal=1, category="bird", categories=CATS,
                      class_log_probs=dict.fromkeys(CATS, 0.0))  # fmt: skip


def _groups(n: int, seed: int) -> list[list[dict]]:
    """Steps of three heads; the hit is the head the classifier reads best as its category,
    other features noise; some steps have no hit, some two."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        own = rng.normal(-3.0, 1.0, size=len(CATS))
        best = int(own.argmax())
        hits = [j == best and rng.random() < 0.9 for j in range(len(CATS))]
        if rng.random() < 0.1:
            hits[(best + 1) % len(CATS)] = True
        out.append([_head(c, llr=float(rng.normal(-5000, 2000)),
                          visible=float(rng.integers(20, 400)), amodal=400.0,
                          clp=dict.fromkeys(CATS, -9.0) | {c: float(own[j])}, hit=hits[j])
                    for j, c in enumerate(CATS)])  # fmt: skip
    return out


def test_fit_matches_scipy_on_the_same_objective():
    groups, l2 = _groups(40, 0), 0.5
    fit = fit_head_choice(groups, categories=CATS, l2=l2)
    usable = [g for g in groups if any(h["hit"] for h in g)]
    x = [np.array([head_features(**{k: h[k] for k in ("llr", "visible", "amodal",
                                                          "class_log_probs", "category")},
                                 categories=CATS) for h in g]) for g in usable]  # fmt: skip
    flat = np.concatenate(x)
    mean, scale = flat.mean(0), flat.std(0, ddof=1)
    scale[scale < 1e-9] = 1.0
    zs = [(g - mean) / scale for g in x]
    hits = [np.array([h["hit"] for h in g]) for g in usable]

    def objective(w: np.ndarray) -> float:
        value = l2 * w @ w
        for z, hit in zip(zs, hits, strict=True):
            s = z @ w
            logp = s - np.logaddexp.reduce(s)
            value -= np.logaddexp.reduce(logp[hit])
        return value

    want = minimize(objective, np.zeros(flat.shape[1]), method="BFGS", options={"gtol": 1e-9})
    np.testing.assert_allclose(fit.weights, want.x, atol=1e-4)
    np.testing.assert_allclose(fit.mean, mean, rtol=1e-9)
    assert objective(np.array(fit.weights)) <= want.fun + 1e-7


def test_fit_learns_the_feature_that_tells_the_hit():
    fit = fit_head_choice(_groups(80, 1), categories=CATS, l2=0.1)
    test = [g for g in _groups(80, 2) if any(h["hit"] for h in g)]
    right = 0
    for g in test:
        scores = [fit.score_head(**{k: h[k] for k in ("llr", "visible", "amodal",
                                                       "class_log_probs", "category")})
                  for h in g]  # fmt: skip
        right += g[int(np.argmax(scores))]["hit"]
        assert fit.choose(g) == int(np.argmax(scores))
    assert right / len(test) >= 0.9
    assert fit.weights[2] > 0  # the class log-probability carries the choice


def test_visible_fraction_by_hand_and_its_fit():
    x = head_features(llr=-120.0, visible=45.0, amodal=60.0, category="bird", categories=CATS,
                      class_log_probs={"airplane": -0.5, "bird": -1.5, "boat": -3.0},
                      extra=("visible fraction",))  # fmt: skip
    assert len(x) == 7 and x[-1] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="unknown extra head features"):
        head_features(llr=0, visible=1, amodal=1, category="bird", categories=CATS,
                      class_log_probs=dict.fromkeys(CATS, 0.0), extra=("size",))  # fmt: skip
    # Steps where the hit is the head nothing claimed yet; its classifier reading is no help.
    rng = np.random.default_rng(5)

    def groups(n):
        out = []
        for _ in range(n):
            fresh = int(rng.integers(3))
            out.append([_head(c, visible=float(80 if j == fresh else rng.integers(5, 40)),
                              amodal=80.0, llr=float(rng.normal(-100, 10)),
                              clp={k: float(rng.normal(-2, 1)) for k in CATS},
                              hit=j == fresh)
                        for j, c in enumerate(CATS)])  # fmt: skip
        return out

    fit = fit_head_choice(groups(60), categories=CATS, l2=0.1, extra=("visible fraction",))
    assert fit.extra == ("visible fraction",) and fit.num_features == 7 and fit.weights[-1] > 0
    test = groups(60)
    assert sum(g[fit.choose(g)]["hit"] for g in test) / len(test) >= 0.9
    assert HeadChoice.from_dict(fit.to_dict()) == fit and fit.to_dict()["extra"] == [
        "visible fraction"
    ]
    with pytest.raises(ValueError, match="distinct names"):
        HeadChoice(CATS, (0.0,) * 7, (0.0,) * 7, (1.0,) * 7, None, ("size",))
    # Kept: a base choice's weights, means and scales stay; only the extra weight is fitted.
    first = fit_head_choice(_groups(40, 6), categories=CATS, l2=0.1)
    data = groups(60)
    kept = fit_head_choice(data, categories=CATS, l2=0.1, base=first,
                           extra=("visible fraction",))  # fmt: skip
    assert kept.weights[:6] == first.weights and kept.mean[:6] == first.mean
    assert kept.scale[:6] == first.scale and kept.weights[-1] > 0
    # the oracle: scipy's minimum of the same penalised objective over the one free weight
    keys = ("llr", "visible", "amodal", "class_log_probs", "category")
    fractions = np.array([h["visible"] / h["amodal"] for g in data for h in g])
    m, sd = fractions.mean(), fractions.std(ddof=1)
    terms = [(np.array([first.score_head(**{k: h[k] for k in keys}) for h in g]),
              np.array([(h["visible"] / h["amodal"] - m) / sd for h in g]),
              np.array([h["hit"] for h in g])) for g in data]  # fmt: skip

    def objective(w):
        value = 0.1 * w * w
        for a, b, hit in terms:
            z = a + w * b
            value -= np.logaddexp.reduce(z[hit]) - np.logaddexp.reduce(z)
        return value

    from scipy.optimize import minimize_scalar

    assert kept.weights[-1] == pytest.approx(minimize_scalar(objective).x, abs=1e-4)
    with pytest.raises(ValueError, match="proper prefix"):
        fit_head_choice(groups(5), categories=CATS, base=first)  # nothing left to fit


def test_checks_and_round_trip():
    fit = fit_head_choice(_groups(20, 3), categories=CATS, model_sha256="abc")
    assert HeadChoice.from_dict(fit.to_dict()) == fit
    assert "extra" not in fit.to_dict()  # a choice without extras keeps its fingerprint
    with pytest.raises(ValueError, match="3 values for 6 features"):
        HeadChoice(CATS, (1.0, 2.0, 3.0), (0.0,) * 6, (1.0,) * 6)
    with pytest.raises(ValueError, match="finite"):
        HeadChoice(CATS, (math.nan,) + (0.0,) * 5, (0.0,) * 6, (1.0,) * 6)
    with pytest.raises(ValueError, match="distinct categories"):
        HeadChoice(("bird", "bird"), (0.0,) * 5, (0.0,) * 5, (1.0,) * 5)
    with pytest.raises(ValueError, match="not a HeadChoice record"):
        HeadChoice.from_dict({"weights": [1.0]})
    with pytest.raises(ValueError, match="nothing to fit"):
        fit_head_choice([[_head("bird"), _head("boat")]], categories=CATS)
    with pytest.raises(ValueError, match="at least one head"):
        fit.choose([])
    with pytest.raises(ValueError, match="l2 must be"):
        fit_head_choice(_groups(5, 4), categories=CATS, l2=-1.0)
    many = fit_head_choice(_groups(20, 3), categories=CATS, per_category=3)
    assert many.per_category == 3 and many.to_dict()["per_category"] == 3
    assert HeadChoice.from_dict(many.to_dict()) == many
    assert "per_category" not in fit.to_dict() and many.fingerprint() != dataclasses.replace(
        many, per_category=1).fingerprint()  # fmt: skip
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="per_category must be an int >= 1"):
            dataclasses.replace(fit, per_category=bad)
    with pytest.raises(ValueError, match="per_category must be an int >= 1"):
        fit_head_choice(_groups(5, 4), categories=CATS, per_category=0)
    record = many.to_dict()  # heads found otherwise than this version finds them: refused
    assert (record["head_pool"], record["head_iou"]) == (HEAD_POOL, 0.5)
    with pytest.raises(ValueError, match="refit it"):
        HeadChoice.from_dict({**record, "head_pool": HEAD_POOL + 1})


@pytest.fixture(scope="module")
def shipped_gm():
    return GenerativeModel.default()


def _favour(gm, category: str, *, sha: str | None = None) -> HeadChoice:
    """A choice that reads only the category one-hot: ``category``'s head always wins."""
    cats = gm.categories
    weights = [0.0] * 4 + [0.0] * (len(cats) - 1)
    if category == cats[0]:
        weights[4:] = [-10.0] * (len(cats) - 1)
    else:
        weights[4 + cats.index(category) - 1] = 10.0
    return HeadChoice(cats, weights, [0.0] * len(weights), [1.0] * len(weights), sha)


def _scene_and_modes(gm, top_k: int):
    """A test scene of two airplanes and two distractors, its bottom-up maps and greedy_map's
    own top-k modes on them (best first)."""
    image = make_scene(targets=("airplane", "airplane"), distractors=2,
                       seed=(split_seed("test"), 777)).image  # fmt: skip
    with torch.no_grad():
        acts = gm.backbone(image[None].to(gm.dtype))
        bu = {n: acts[n] for n in gm.hidden_levels}
        return image, bu, greedy_map(gm, bu, top_k=top_k).modes[0]


def _best_per_category(gm, modes) -> dict[str, dict]:
    """Category name -> its best finite mode's assignment (``modes`` best first), in the
    order the categories first appear."""
    best: dict[str, dict] = {}
    for a, lj in modes:
        if math.isfinite(lj):
            best.setdefault(gm.categories[int(a["category"])], a)
    return best


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("which", ["first", "last"])
def test_the_parse_takes_the_chosen_categorys_best_mode(shipped_gm, which):
    gm = shipped_gm
    top_k = 30
    # the oracle: greedy_map's own top-k on the scene's activations; a category's head is its
    # mode of largest log-joint (one row: largest LLR)
    image, _, modes = _scene_and_modes(gm, top_k)
    best = _best_per_category(gm, modes)
    assert len(best) >= 2  # the choice has something to choose between
    category = list(best)[0 if which == "first" else -1]
    choice = _favour(gm, category, sha=model_fingerprint(gm))
    inst = run_parse(gm, image, top_k=top_k, max_objects=1, threshold=-math.inf,
                     choose=choice).instances[0]  # fmt: skip
    assert inst.category == category
    got = {k: int(v) for k, v in inst.assignment.items()}
    assert got == {k: int(v) for k, v in best[category].items()}
    # what the step chose among: one head per category of the oracle's modes, the chosen first
    assert sorted(h["category"] for h in inst.heads) == sorted(best)
    assert inst.heads[0]["category"] == category and inst.heads[0]["llr"] == inst.llr
    assert [h["score"] for h in inst.heads] == sorted((h["score"] for h in inst.heads),
                                                      reverse=True)  # fmt: skip
    assert torch.equal(inst.heads[0]["amodal_mask"], inst.amodal_mask)
    assert torch.equal(inst.heads[0]["mask"], inst.mask)  # first step: nothing claimed
    for h in inst.heads:  # one view of the model's size: pixels counted in the image
        assert h["visible"] == h["amodal"] == float(h["amodal_mask"].sum())


@pytest.mark.usefixtures("one_thread")
def test_more_heads_per_category_are_the_next_modes_whose_masks_differ(shipped_gm):
    """``per_category=2``: each category's heads are its best mode by LLR (greedy's order on one
    row) and the next of its ``HEAD_POOL * 2`` best whose amodal mask overlaps the first by IoU
    < 0.5 — masks completed here from greedy_map's modes by the top-down pass."""
    gm = shipped_gm
    top_k = 60
    image, bu, modes = _scene_and_modes(gm, top_k)
    by_cat: dict[str, list] = {}
    for a, lj in modes:  # best first
        if math.isfinite(lj):
            by_cat.setdefault(gm.categories[int(a["category"])], []).append((a, lj))
    want: dict[str, list[float]] = {}  # category -> its heads' log-joints
    for cat, ranked in by_cat.items():
        pool = ranked[: HEAD_POOL * 2]
        values = {s: torch.tensor([int(a[s]) for a, _ in pool]) for s in pool[0][0]}
        big = {n: x.expand(len(pool), *x.shape[1:]) for n, x in bu.items()}
        obs = {n: torch.ones_like(x, dtype=torch.bool) for n, x in big.items()}
        with torch.no_grad():
            td, _ = top_down_pass(gm, values, big, obs)
            masks = object_mask(gm, td, big, obs)  # (n, S, S): one view of the model's size
        inter = (masks & masks[0]).flatten(1).sum(1)
        union = (masks | masks[0]).flatten(1).sum(1).clamp(min=1)
        second = [j for j in range(1, len(pool)) if inter[j] / union[j] < 0.5]
        want[cat] = [pool[0][1]] + [pool[j][1] for j in second[:1]]
    assert any(len(v) == 2 for v in want.values())  # some category offers a second head
    choice = dataclasses.replace(_favour(gm, "bird", sha=model_fingerprint(gm)), per_category=2)
    inst = run_parse(gm, image, top_k=top_k, max_objects=1, threshold=-math.inf,
                     choose=choice).instances[0]  # fmt: skip
    got: dict[str, list[float]] = {}
    for h in sorted(inst.heads, key=lambda h: -h["llr"]):
        got.setdefault(h["category"], []).append(h["llr"])
    bg = inst.log_joint - inst.llr  # one row: LLR = log-joint - its background's
    assert {c: [round(x + bg, 3) for x in v] for c, v in got.items()} == {
        c: [round(x, 3) for x in v] for c, v in want.items()}  # fmt: skip
    for cat in got:  # a category's two heads differ
        masks = [h["amodal_mask"] for h in inst.heads if h["category"] == cat]
        if len(masks) == 2:
            assert (masks[0] & masks[1]).sum() / (masks[0] | masks[1]).sum() < 0.5
    assert inst.category == "bird"  # the choice picks among all of them


@pytest.mark.usefixtures("one_thread")
def test_refined_heads_are_read_on_the_crf_masks_of_greedys_modes(shipped_gm):
    """``refined_heads``: each head's masks are the colour CRF's of that category's best mode
    (greedy_map's, completed here by the top-down pass and refined by ``crf_mask``), what the
    choice read is counted on them, and the chosen head's is the instance's mask."""
    gm = shipped_gm
    top_k = 30
    image, bu, modes = _scene_and_modes(gm, top_k)
    best = _best_per_category(gm, modes)
    pick = list(best)[-1]  # the category whose best mode ranks last
    choice = dataclasses.replace(_favour(gm, pick, sha=model_fingerprint(gm)),
                                 refined_heads=True)  # fmt: skip
    assert HeadChoice.from_dict(choice.to_dict()) == choice
    assert choice.to_dict()["refined_heads"] is True
    inst = run_parse(gm, image, top_k=top_k, max_objects=1, threshold=-math.inf,
                     choose=choice, refine_masks=True).instances[0]  # fmt: skip
    assert sorted(h["category"] for h in inst.heads) == sorted(best)
    obs = {n: torch.ones_like(x, dtype=torch.bool) for n, x in bu.items()}
    for h in inst.heads:
        a = best[h["category"]]
        with torch.no_grad():
            td, _ = top_down_pass(gm, {k: torch.tensor([int(v)]) for k, v in a.items()}, bu, obs)
            want = crf_mask(gm, td, bu, image[None], observed=obs)[0]  # (S, S): one view
        assert torch.equal(h["amodal_mask"], want) and torch.equal(h["mask"], want)
        assert h["visible"] == h["amodal"] == float(want.sum())
    assert inst.heads[0]["category"] == inst.category == pick
    assert torch.equal(inst.amodal_mask, inst.heads[0]["amodal_mask"])
    with pytest.raises(ValueError, match="refine_masks=True"):
        run_parse(gm, image, top_k=top_k, max_objects=1, choose=choice)


@pytest.mark.usefixtures("one_thread")
def test_a_second_step_counts_what_the_first_claimed(shipped_gm):
    """A choice that weighs only the visible fraction: on step 2 each head's visible pixels are
    its amodal mask less step 1's instance, and the chosen head has the largest fraction."""
    gm = shipped_gm
    image = make_scene(targets=("airplane", "airplane"), distractors=2,
                       seed=(split_seed("test"), 777)).image  # fmt: skip
    n = 4 + len(gm.categories) - 1 + 1
    choice = HeadChoice(gm.categories, [0.0] * (n - 1) + [10.0], [0.0] * n, [1.0] * n,
                        model_fingerprint(gm), ("visible fraction",))  # fmt: skip
    first, second = run_parse(gm, image, top_k=30, max_objects=2, threshold=-math.inf,
                              choose=choice).instances  # fmt: skip
    for h in second.heads:
        want = h["amodal_mask"] & ~first.mask
        assert torch.equal(h["mask"], want) and h["visible"] == float(want.sum())
    fractions = [h["visible"] / max(h["amodal"], 1.0) for h in second.heads]
    assert fractions[0] == max(fractions) and second.heads[0]["category"] == second.category
    assert torch.equal(second.mask, second.heads[0]["mask"])
    assert run_parse(gm, image, top_k=30, max_objects=1).instances[0].heads is None


def test_the_parse_refuses_a_choice_it_cannot_use(shipped_gm):
    gm, image = shipped_gm, torch.rand(3, 64, 64)
    with pytest.raises(TypeError, match="HeadChoice"):
        run_parse(gm, image, choose="bird")
    other = HeadChoice(("a", "b"), (0.0,) * 5, (0.0,) * 5, (1.0,) * 5)
    with pytest.raises(ValueError, match="fitted for the categories"):
        run_parse(gm, image, choose=other)
    with pytest.raises(ValueError, match="another model"):
        run_parse(gm, image, choose=_favour(gm, "bird", sha="0" * 64))
