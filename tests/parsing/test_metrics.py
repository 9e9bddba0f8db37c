"""Instance-mask metrics against independent oracles: hand-computed cases, brute force over
permutations and pixel pairs, scikit-learn's ARI where installed, and COCO AP values worked out
from COCO's 101-point interpolation by hand."""

import itertools
import math

import numpy as np
import pytest

from pyro_backpass import (
    InstanceEvaluation,
    PredictedInstances,
    adjusted_rand_index,
    class_sensitivity,
    coco_mask_ap,
    foreground_ari,
    make_scene,
    mask_ious,
    match_instances,
    occluded_iou,
)

CATS = ("airplane", "car")


def box(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def test_mask_ious_by_hand():
    a = box(4, 4, 0, 0, 2, 2)  # 4 px
    b = box(4, 4, 0, 0, 2, 4)  # 8 px, contains a
    c = box(4, 4, 2, 2, 4, 4)  # 4 px, disjoint from a
    ious = mask_ious(np.stack([a, b]), np.stack([a, c, np.zeros_like(a)]))
    np.testing.assert_allclose(ious, [[1.0, 0.0, 0.0], [0.5, 0.0, 0.0]])


@pytest.mark.parametrize("n_pred, n_true", [(1, 3), (3, 3), (4, 2), (0, 2)])
def test_hungarian_matches_brute_force(n_pred, n_true):
    rng = np.random.default_rng(n_pred * 10 + n_true)
    for _ in range(5):
        pred = rng.random((n_pred, 6, 6)) < 0.4
        true = rng.random((n_true, 6, 6)) < 0.4
        m = match_instances(pred, true)
        ious = mask_ious(pred, true)
        # Every injective assignment of the smaller side, enumerated.
        best = 0.0
        if n_pred <= n_true:
            for perm in itertools.permutations(range(n_true), n_pred):
                best = max(best, sum(ious[i, j] for i, j in enumerate(perm)))
        else:
            for perm in itertools.permutations(range(n_pred), n_true):
                best = max(best, sum(ious[i, j] for j, i in enumerate(perm)))
        assert len(m.pairs) == min(n_pred, n_true)
        assert len({p for p, _ in m.pairs}) == len({t for _, t in m.pairs}) == len(m.pairs)
        assert sum(ious[p, t] for p, t in m.pairs) == pytest.approx(best)


def ari_by_pairs(a, b):
    """The adjusted Rand index from its definition: count item pairs one by one."""
    n = len(a)
    same_a = same_b = same_both = 0
    for i in range(n):
        for j in range(i + 1, n):
            sa, sb = a[i] == a[j], b[i] == b[j]
            same_a += sa
            same_b += sb
            same_both += sa and sb
    pairs = n * (n - 1) / 2
    expected = same_a * same_b / pairs
    top = (same_a + same_b) / 2
    return 1.0 if top == expected else (same_both - expected) / (top - expected)


@pytest.mark.parametrize("seed", range(6))
def test_ari_matches_pair_counting(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    a = rng.integers(0, int(rng.integers(1, 5)), n)
    b = rng.integers(0, int(rng.integers(1, 5)), n)
    assert adjusted_rand_index(a, b) == pytest.approx(ari_by_pairs(a, b))


def test_ari_matches_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.integers(0, 4, 50), rng.integers(0, 3, 50)
        assert adjusted_rand_index(a, b) == pytest.approx(metrics.adjusted_rand_score(a, b))


def test_ari_limits():
    a = np.array([0, 0, 1, 1, 2])
    assert adjusted_rand_index(a, a + 7) == pytest.approx(1.0)  # relabelled: same partition
    assert adjusted_rand_index(np.zeros(5), np.zeros(5)) == 1.0  # both trivial


def test_foreground_ari_by_hand():
    a, b = box(6, 6, 0, 0, 3, 6), box(6, 6, 3, 0, 6, 3)
    true = np.stack([a, b])
    assert foreground_ari(true, true) == pytest.approx(1.0)
    # Background pixels do not count: a perfect parse that also claims them stays perfect.
    assert foreground_ari(np.stack([a | box(6, 6, 3, 3, 6, 6), b]), true) == pytest.approx(1.0)
    # One instance for both objects: one predicted cluster against two true ones gives 0.
    assert foreground_ari(np.stack([a | b]), true) == pytest.approx(0.0)
    # Nothing predicted: all foreground in the "no instance" cluster, also 0.
    assert foreground_ari(np.zeros((0, 6, 6), dtype=bool), true) == pytest.approx(0.0)


def test_class_sensitivity_by_hand():
    mask = box(2, 2, 0, 0, 1, 2)  # top row
    s = np.array([[1.0, 2.0], [-5.0, 1.0]])  # positive mass 4, 3 of it in the top row
    assert class_sensitivity(s, mask) == pytest.approx(0.75)
    assert class_sensitivity(np.stack([s, s]), mask) == pytest.approx(0.75)  # channels summed
    assert class_sensitivity(-np.ones((2, 2)), mask) == 0.0


def test_occluded_iou_by_hand():
    true_amodal = box(4, 4, 0, 0, 4, 2)  # 8 px
    visible = box(4, 4, 0, 0, 2, 2)  # the top 4 px; the bottom 4 px are hidden
    guess = box(4, 4, 0, 0, 3, 2) | box(4, 4, 0, 3, 1, 4)  # 2 hidden px right, 1 px outside
    # hidden part of the guess: 2 px inside the hidden area + 1 px outside; union 5, inter 2
    assert occluded_iou(guess, true_amodal, visible) == pytest.approx(2 / 5)
    assert occluded_iou(true_amodal, true_amodal, visible) == pytest.approx(1.0)
    assert occluded_iou(visible, true_amodal, visible) == 0.0  # no completion at all


def instances(masks, cats, scores=None):
    scores = np.ones(len(masks)) if scores is None else np.asarray(scores)
    return PredictedInstances(np.stack(masks), scores, tuple(cats))


def test_coco_ap_perfect_empty_and_half():
    a, b = box(16, 16, 0, 0, 8, 8), box(16, 16, 8, 8, 16, 16)
    truth = [instances([a, b], CATS)]
    assert coco_mask_ap(truth, truth, categories=CATS) == {"ap": 1.0, "ap50": 1.0}
    empty = [PredictedInstances.empty((16, 16))]
    assert coco_mask_ap(empty, truth, categories=CATS) == {"ap": 0.0, "ap50": 0.0}
    # One of two objects found exactly: precision 1 up to recall 0.5, none beyond; COCO
    # averages precision at 101 recall points, 51 of which are <= 0.5.
    half = coco_mask_ap([instances([a], CATS[:1])], truth, categories=CATS)
    assert half["ap"] == pytest.approx(51 / 101) and half["ap50"] == pytest.approx(51 / 101)
    # With categories, a right mask of the wrong category is a miss; class-agnostic it is not.
    wrong = [instances([a, b], CATS[::-1])]
    assert coco_mask_ap(wrong, truth, categories=CATS)["ap"] == 1.0
    assert coco_mask_ap(wrong, truth, categories=CATS, use_categories=True)["ap"] == 0.0


def test_evaluation_of_parses_built_from_the_truth():
    scenes = [make_scene(targets=("airplane", "airplane"), distractors=1, seed=(7, i))
              for i in range(3)]  # fmt: skip
    cats = ("airplane", "bird", "boat", "car", "chair")
    perfect, dropped, extra = (InstanceEvaluation(cats) for _ in range(3))
    n_true = 0
    for scene in scenes:
        masks = [inst.mask.numpy() for inst in scene.instances]
        amodal = np.stack([inst.amodal_mask.numpy() for inst in scene.instances])
        names = [inst.category for inst in scene.instances]
        truth = instances(masks, names)
        n_true += len(masks)
        perfect.add(truth, truth, pred_amodal=amodal, true_amodal=amodal)
        dropped.add(instances(masks[1:], names[1:]), truth)
        extra.add(instances([*masks, scene.clutter_mask.numpy()], [*names, "car"]), truth)
    s = perfect.summary()
    for key in ("recall_iou50", "precision_iou50", "mean_matched_iou", "mask_ap",
                "mask_ap_category", "count_accuracy", "foreground_ari"):  # fmt: skip
        assert s[key] == pytest.approx(1.0), key
    if s["occluded_instances"]:
        assert s["amodal_iou"] == pytest.approx(1.0) and s["occluded_iou"] == pytest.approx(1.0)
    d = dropped.summary()
    assert d["recall_iou50"] == pytest.approx((n_true - 3) / n_true)
    assert d["precision_iou50"] == 1.0 and d["count_accuracy"] == 0.0
    assert d["mean_matched_iou"] == pytest.approx((n_true - 3) / n_true)
    e = extra.summary()
    assert e["recall_iou50"] == 1.0
    assert e["precision_iou50"] == pytest.approx(n_true / (n_true + 3))
    assert not math.isnan(e["foreground_ari"])


def test_evaluation_without_amodal_prediction_scores_the_visible_mask():
    visible, amodal = box(8, 8, 0, 0, 4, 4), box(8, 8, 0, 0, 4, 8)  # half hidden
    ev = InstanceEvaluation(CATS)
    ev.add(instances([visible], CATS[:1]), instances([visible], CATS[:1]),
           true_amodal=amodal[None])  # fmt: skip
    s = ev.summary()
    assert s["occluded_instances"] == 1
    assert s["amodal_iou"] == pytest.approx(0.5) and s["occluded_iou"] == 0.0


def test_bad_inputs_are_named():
    with pytest.raises(TypeError, match="bool"):
        mask_ious(np.zeros((1, 2, 2)), np.zeros((1, 2, 2), dtype=bool))
    with pytest.raises(ValueError, match="sizes differ"):
        mask_ious(np.zeros((1, 2, 2), dtype=bool), np.zeros((1, 3, 3), dtype=bool))
    with pytest.raises(ValueError, match="one of each"):
        PredictedInstances(np.zeros((2, 2, 2), dtype=bool), np.ones(1), ("a", "b"))
