"""``consensus_below`` (issue #10, rung (b)): its choice against brute force — one greedy call
per clamped state below the kept top level, each mask refined by ``refine_mask``, and the
consensus found by a loop over pixel sets — and its errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pyro_backpass import (
    CategoricalPrior,
    DescentVerifier,
    consensus_below,
    greedy_map,
    log_joint,
    refine_mask,
)
from pyro_backpass.inference import lower_sites

pytestmark = pytest.mark.usefixtures("one_thread")


def _consensus_by_pixel_sets(masks, *, skip_empty: bool, logits=None) -> int:
    """The first mask of highest expected IoU with all the masks (itself included) under
    softmax(``logits``) (uniform if None); with ``skip_empty``, among the non-empty ones only
    (unless every one is empty)."""
    sets = [set(map(tuple, m.nonzero().tolist())) for m in masks]
    among = [j for j, a in enumerate(sets) if a or not skip_empty]
    among = among or list(range(len(sets)))
    logits = [0.0] * len(sets) if logits is None else logits
    z = [math.exp(logits[i] - max(logits[j] for j in among)) for i in among]
    p = {i: zi / sum(z) for i, zi in zip(among, z, strict=True)}

    def iou(a: set, b: set) -> float:
        return 1.0 if not a | b else len(a & b) / len(a | b)

    risk = {j: sum(p[i] * iou(sets[i], sets[j]) for i in among) for j in among}
    return max(among, key=lambda j: (risk[j], -j))


def _oracle(gm, bu, image, keep: dict, levels_below: int, fixed: dict, *, skip_empty: bool = True,
            area_temperature: float | None = None, observed=None) -> dict[str, int]:  # fmt: skip
    """Every state below ``keep`` (category and top level) completed by its own greedy call,
    refined, and chosen by consensus over pixel sets."""
    sites = lower_sites(gm, levels_below)
    ranges = [[fixed[s]] if s in fixed else range(gm.site_sizes[s]) for s in sites]
    found, masks = [], []
    for state in itertools.product(*ranges):
        clamp = {**keep, **dict(zip(sites, state, strict=True))}
        result = greedy_map(gm, bu, clamp=clamp, observed=observed)
        if not torch.isfinite(result.log_joint).all():
            continue
        found.append(result)
        masks.append(refine_mask(gm, result, bu, image, observed=observed)[0])
    logits = None
    if area_temperature is not None:  # weights softmax(log(1 + area) / T)
        logits = [math.log1p(int(m.sum())) / area_temperature for m in masks]
    best = found[_consensus_by_pixel_sets(masks, skip_empty=skip_empty, logits=logits)]
    return {s: int(v[0]) for s, v in best.assignment.items()}


def _keep(gm, result) -> dict[str, int]:
    top = gm.hidden_levels[-1]
    return {s: int(result.assignment[s][0]) for s in ("category", f"gamma_{top}", f"delta_{top}")}


@pytest.mark.parametrize("skip_empty", [True, False])
def test_consensus_below_one_level_matches_brute_force(airplane_scene, skip_empty):
    gm, scene, bu = airplane_scene
    first = greedy_map(gm, bu, category="airplane", top_k=2)
    result = consensus_below(gm, bu, first, levels_below=1, skip_empty=skip_empty)
    keep = _keep(gm, first)
    oracle = _oracle(gm, bu, scene.image, keep, 1, {}, skip_empty=skip_empty)
    for site, v in oracle.items():
        assert int(result.assignment[site][0]) == v, site
    # Its log-joint is its own: the objective at the chosen assignment.
    assert torch.allclose(result.log_joint, log_joint(gm, bu, oracle).detach(), atol=1e-3)
    assert result.modes == first.modes


def _area_verifier(gm, *, refine_masks: bool = True, levels_below: int = 0) -> DescentVerifier:
    """Scores a descent by log(1 + its refined mask's pixels) (the area column); airplane."""
    n, f = len(gm.categories), 400
    weight = torch.zeros(n, f, dtype=torch.float64)
    weight[0, len(gm.hidden_levels) + 1] = 1.0
    return DescentVerifier(categories=gm.categories, read_levels=("pool3", "conv4_1", "pool4"),
                           weight=weight, mean=torch.zeros(n, f), scale=torch.ones(n, f),
                           fitted=torch.tensor([True] + [False] * (n - 1)), top_k=4,
                           refine_masks=refine_masks, levels_below=levels_below)  # fmt: skip


def test_consensus_below_weighted_by_a_verifier_matches_brute_force(airplane_scene):
    gm, scene, bu = airplane_scene
    first = greedy_map(gm, bu, category="airplane")
    result = consensus_below(gm, bu, first, levels_below=1, verifier=_area_verifier(gm),
                             temperature=0.5)  # fmt: skip
    oracle = _oracle(gm, bu, scene.image, _keep(gm, first), 1, {}, area_temperature=0.5)
    for site, v in oracle.items():
        assert int(result.assignment[site][0]) == v, site
    # The weights matter on this scene: the uniform vote picks another completion.
    uniform = _oracle(gm, bu, scene.image, _keep(gm, first), 1, {})
    assert uniform != oracle
    with pytest.raises(ValueError, match="must score them"):
        consensus_below(gm, bu, first, levels_below=1, verifier=_area_verifier(
            gm, refine_masks=False))  # fmt: skip
    with pytest.raises(ValueError, match="temperature must be"):
        consensus_below(gm, bu, first, levels_below=1, verifier=_area_verifier(gm),
                        temperature=0.0)  # fmt: skip
    with pytest.raises(TypeError, match="temperature must be a number"):
        consensus_below(gm, bu, first, levels_below=1, verifier=_area_verifier(gm),
                        temperature="4")  # fmt: skip
    with pytest.raises(ValueError, match="first-stage verifier"):
        consensus_below(gm, bu, first, levels_below=1, verifier=_area_verifier(gm, levels_below=1))
    # Every completion forbidden (a prior without mass on the clamped γ): a clear error.
    size = gm.site_sizes["gamma_conv4_1"]
    forbid = {"gamma_conv4_1": CategoricalPrior([0.0] + [1.0] * (size - 1))}
    for verifier in (None, _area_verifier(gm)):
        with pytest.raises(ValueError, match="no completion below the kept top level"):
            consensus_below(gm, bu, first, levels_below=1, verifier=verifier,
                            clamp={"gamma_conv4_1": 0}, priors=forbid)  # fmt: skip
    bird = greedy_map(gm, bu, category="bird")
    with pytest.raises(ValueError, match="no weights for 'bird'"):
        consensus_below(gm, bu, bird, levels_below=1, verifier=_area_verifier(gm))


def test_consensus_below_two_levels_keeps_the_clamps(airplane_scene):
    gm, scene, bu = airplane_scene
    top = gm.hidden_levels[-1]
    first = greedy_map(gm, bu, category="airplane")
    keep = _keep(gm, first)
    fixed = {"gamma_conv4_1": 2, "gamma_pool3": 1}  # 9 completions: δ of pool3
    clamp = {**fixed, f"gamma_{top}": keep[f"gamma_{top}"]}
    result = consensus_below(gm, bu, first, levels_below=2, clamp=clamp)
    oracle = _oracle(gm, bu, scene.image, keep, 2, fixed)
    assert oracle["gamma_conv4_1"] == 2 and oracle["gamma_pool3"] == 1
    for site, v in oracle.items():
        assert int(result.assignment[site][0]) == v, site


def test_consensus_below_errors(airplane_scene):
    gm, _, bu = airplane_scene
    top = gm.hidden_levels[-1]
    first = greedy_map(gm, bu, category="airplane")
    with pytest.raises(TypeError, match="skip_empty must be a bool"):
        consensus_below(gm, bu, first, skip_empty=1)
    with pytest.raises(TypeError, match="must be a MapResult"):
        consensus_below(gm, bu, first.assignment)
    other = (int(first.assignment[f"gamma_{top}"][0]) + 1) % gm.site_sizes[f"gamma_{top}"]
    with pytest.raises(ValueError, match="clamp disagrees with result"):
        consensus_below(gm, bu, first, levels_below=1, clamp={f"gamma_{top}": other})
    with pytest.raises(ValueError, match="levels_below must be in"):
        consensus_below(gm, bu, first, levels_below=len(gm.hidden_levels))
    two = {k: v.expand(2, *v.shape[1:]) for k, v in bu.items()}
    with pytest.raises(ValueError, match="result has batch 1 but bu has batch 2"):
        consensus_below(gm, two, first, levels_below=1)
    with pytest.raises(ValueError, match="needs the image level"):
        consensus_below(gm, {k: v for k, v in bu.items() if k != "image"}, first)


def test_consensus_below_takes_each_image_of_a_batch_alone(airplane_scene):
    """Two images (the scene twice, two different top levels kept): each image's choice is the
    one-image call's, which the brute-force tests above check."""
    gm, _, bu = airplane_scene
    top = gm.hidden_levels[-1]
    two = {k: v.expand(2, *v.shape[1:]) for k, v in bu.items()}
    first = greedy_map(gm, bu, category="airplane", top_k=2)
    tops = [dict(first.modes[0][j][0]) for j in range(2)]
    clamp = {s: torch.tensor([t[s] for t in tops]) for s in (f"gamma_{top}", f"delta_{top}")}
    both = greedy_map(gm, two, category="airplane", clamp=clamp)
    result = consensus_below(gm, two, both, levels_below=1, clamp=clamp)
    for i in range(2):
        mine = {s: int(v[i]) for s, v in clamp.items()}
        one = greedy_map(gm, bu, category="airplane", clamp=mine)
        alone = consensus_below(gm, bu, one, levels_below=1, clamp=mine)
        for site, v in alone.assignment.items():
            assert int(result.assignment[site][i]) == int(v[0]), (i, site)


def test_consensus_below_under_an_occluder_matches_brute_force(airplane_scene):
    """With the image's left half unobserved, every completion and its refined mask are the
    occluded pass's (each state's own greedy call and refine_mask with ``observed``)."""
    gm, scene, bu = airplane_scene
    seen = torch.ones(1, 1, *scene.image.shape[-2:], dtype=torch.bool)
    seen[..., : scene.image.shape[-1] // 2] = False
    observed = {"image": seen}
    first = greedy_map(gm, bu, category="airplane", observed=observed)
    result = consensus_below(gm, bu, first, levels_below=1, observed=observed)
    oracle = _oracle(gm, bu, scene.image, _keep(gm, first), 1, {}, observed=observed)
    for site, v in oracle.items():
        assert int(result.assignment[site][0]) == v, site
    expected = log_joint(gm, bu, oracle, observed=observed).detach()
    assert torch.allclose(result.log_joint, expected, atol=1e-3)
