"""``run_parse(..., verifier={category: DescentVerifier})``: each category's modes chosen by its
own verifier, consensus and CRF-refined masks as ``verified_map`` uses them — checked against
brute force: every mode completed by ``top_down_pass`` (or ``greedy_map`` clamped to it and
``refine_mask``), its mask's area the verifier's score, the expected IoU of the vote summed
pair by pair in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyro_backpass import (
    DescentVerifier,
    GenerativeModel,
    greedy_map,
    make_scene,
    refine_mask,
    sample,
    split_seed,
)
from pyro_backpass.inference import object_mask, top_down_pass
from pyro_backpass.parsing import Query, parse_activations, run_parse

TOP = "pool4"
pytestmark = pytest.mark.usefixtures("one_thread")


def _area_verifier(gm, *, sign: float = 1.0, fitted=None, **options) -> DescentVerifier:
    """A verifier whose score of a descent is ``sign × log(1 + mask pixels)``."""
    n, f = len(gm.categories), len(gm.hidden_levels) + 2 + len(gm.categories) + 2 * 192
    weight = torch.zeros(n, f, dtype=torch.float64)
    weight[:, len(gm.hidden_levels) + 1] = sign  # the log-area column
    fitted = torch.ones(n, dtype=torch.bool) if fitted is None else fitted
    return DescentVerifier(categories=gm.categories, read_levels=("pool3", "conv4_1", "pool4"),
                           weight=weight, mean=torch.zeros(n, f), scale=torch.ones(n, f),
                           fitted=fitted, top_k=10, **options)  # fmt: skip


def _vote(masks: list[np.ndarray], scores: np.ndarray, tau: float) -> int:
    """The mask of highest expected IoU under softmax(scores / τ), pair by pair (ties: first)."""
    w = np.exp((scores - scores.max()) / tau)
    w /= w.sum()

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        union = (a | b).sum()
        return 1.0 if union == 0 else float((a & b).sum()) / float(union)

    value = [sum(w[j] * iou(m, masks[j]) for j in range(len(masks))) for m in masks]
    return int(np.argmax(value))


@pytest.fixture(scope="module")
def plain_gm():
    return GenerativeModel.default().attach_mask_readout(None)


@pytest.fixture(scope="module")
def two_airplanes(plain_gm):
    gm = plain_gm
    offs = gm.offsets[TOP]
    clamp = {f"gamma_{TOP}": 0, f"delta_{TOP}": torch.tensor([offs.index((0, -1)),
                                                              offs.index((0, 1))])}  # fmt: skip
    s = sample(gm, 2, category="airplane", noise=0.0, seed=0, clamp=clamp)
    return {n: torch.maximum(s.td[n][:1], s.td[n][1:]) for n in gm.hidden_levels}


@pytest.mark.parametrize("tau", [0.3, 100.0])
def test_consensus_verifier_chooses_the_votes_mask(plain_gm, two_airplanes, tau):
    gm, bu = plain_gm, two_airplanes
    vote = _area_verifier(gm, consensus=tau)
    verifiers = {**dict.fromkeys(gm.categories, _area_verifier(gm)), "airplane": vote}
    inst = parse_activations(
        gm,
        bu,
        max_objects=1,
        threshold=-math.inf,
        query=Query(category="airplane"),
        verifier=verifiers,
    ).instances[0]
    masks, areas = [], []
    for a, _ in inst.modes:
        td, _ = top_down_pass(gm, {s: torch.tensor([v]) for s, v in a.items()}, bu, {})
        m = object_mask(gm, td)[0].numpy()
        masks.append(m)
        areas.append(math.log1p(m.sum()))
    best = _vote(masks, np.array(areas), tau)
    assert inst.assignment == inst.modes[best][0]
    # The same parse with the vote's own choice rule in verified_map's terms: one verifier
    # without consensus picks the largest mask instead (so the two differ here, or tau is moot).
    if tau == 100.0:
        largest = parse_activations(gm, bu, max_objects=1, threshold=-math.inf,
                                    query=Query(category="airplane"),
                                    verifier=_area_verifier(gm)).instances[0]  # fmt: skip
        assert largest.assignment == inst.modes[int(np.argmax(areas))][0]


def test_each_category_uses_its_own_verifier(plain_gm, two_airplanes):
    """The largest-mask verifier for airplanes and the smallest-mask one for the rest: with the
    category left free, each category's head is its own verifier's best."""
    gm, bu = plain_gm, two_airplanes
    small = _area_verifier(gm, sign=-1.0)
    verifiers = {**dict.fromkeys(gm.categories, small), "airplane": _area_verifier(gm)}
    inst = parse_activations(gm, bu, max_objects=1, threshold=-math.inf,
                             verifier=verifiers).instances[0]  # fmt: skip
    mine = [a for a, _ in inst.modes if a["category"] == inst.assignment["category"]]

    def area(a) -> int:
        td, _ = top_down_pass(gm, {s: torch.tensor([v]) for s, v in a.items()}, bu, {})
        return int(object_mask(gm, td)[0].sum())

    sign = 1 if gm.categories[inst.assignment["category"]] == "airplane" else -1
    assert sign * area(inst.assignment) == max(sign * area(a) for a in mine)


def test_refined_verifier_scores_the_crf_masks():
    """A verifier with ``refine_masks`` ranks the modes by their CRF-refined masks: the first
    instance is the mode whose ``refine_mask`` is largest (on a scene where the readout's own
    largest mask is another mode's: checked)."""
    gm = GenerativeModel.default()
    scene = make_scene(seed=split_seed("test", 4))
    verifier = _area_verifier(gm, refine_masks=True)
    inst = run_parse(gm, scene.image, max_objects=1, threshold=-math.inf, top_k=4,
                     query=Query(category="airplane"),
                     verifier={"airplane": verifier}).instances[0]  # fmt: skip
    bu = {k: v for k, v in gm.backbone(scene.image[None]).items() if k in gm.hidden_levels}
    areas, plain = [], []
    for a, _ in inst.modes:
        again = greedy_map(gm, bu, clamp={s: torch.tensor([v]) for s, v in a.items()})
        areas.append(int(refine_mask(gm, again, bu, scene.image)[0].sum()))
        plain.append(int(again.mask[0].sum()))
    best = max(range(len(areas)), key=lambda j: (areas[j], -j))
    assert best != max(range(len(plain)), key=lambda j: (plain[j], -j))  # a precondition
    assert inst.assignment == inst.modes[best][0]


def test_a_mapping_names_its_problems(plain_gm, two_airplanes):
    gm, bu = plain_gm, two_airplanes
    v = _area_verifier(gm)
    with pytest.raises(ValueError, match=r"unknown categories \['plane'\]"):
        parse_activations(gm, bu, max_objects=1, verifier={"plane": v})
    with pytest.raises(ValueError, match="maps no verifier to"):
        parse_activations(gm, bu, max_objects=1, verifier={"airplane": v})
    with pytest.raises(TypeError, match="must be a DescentVerifier"):
        parse_activations(gm, bu, max_objects=1, query=Query(category="airplane"),
                          verifier={"airplane": "shipped"})  # fmt: skip
    only_bird = _area_verifier(gm, fitted=torch.arange(len(gm.categories)) == 1)
    with pytest.raises(ValueError, match=r"no weights for \['airplane'\]"):
        parse_activations(gm, bu, max_objects=1, query=Query(category="airplane"),
                          verifier={"airplane": only_bird})  # fmt: skip
