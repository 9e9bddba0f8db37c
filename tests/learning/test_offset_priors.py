"""fit_offset_priors against per-object backward passes counted by hand."""

from __future__ import annotations

import pytest
import torch

from pyro_backpass import GenerativeModel, RenderedObjects, fit_offset_priors, greedy_map, sample


@pytest.fixture(scope="module")
def objects():
    gm = GenerativeModel.default()
    pairs = [RenderedObjects(cat, 2, seed=11)[i] for cat in ("airplane", "car") for i in range(2)]
    images = torch.stack([image for image, _ in pairs])
    labels = torch.tensor([gm.categories.index(c) for c in ("airplane",) * 2 + ("car",) * 2])
    return gm, images, labels


def test_the_priors_are_the_smoothed_counts_of_each_objects_own_pass(objects):
    gm, images, labels = objects
    priors = fit_offset_priors(gm, images, labels, concentration=3.0, batch_size=3)
    names = [n for n in gm.hidden_levels if gm.steps[n].num_offsets > 1]
    assert sorted(priors) == sorted(f"delta_{n}" for n in names)
    counts = {n: torch.zeros(gm.steps[n].num_offsets) for n in names}
    for image, label in zip(images, labels, strict=True):  # one object at a time
        acts = gm.backbone(image[None])
        picked = greedy_map(gm, {k: v for k, v in acts.items() if k in gm.hidden_levels},
                            category=int(label)).assignment  # fmt: skip
        for n in names:
            counts[n][int(picked[f"delta_{n}"])] += 1
    for n, c in counts.items():
        expected = (c + 2.0) / (c + 2.0).sum()
        torch.testing.assert_close(priors[f"delta_{n}"].probs, expected, check_dtype=False)


def test_with_concentration_one_samples_take_the_one_offset_seen(objects):
    gm, images, labels = objects
    top = gm.hidden_levels[-1]
    priors = fit_offset_priors(gm, images[:1], labels[:1], levels=[top], concentration=1.0)
    (seen,) = priors[f"delta_{top}"].probs.nonzero().flatten().tolist()
    drawn = sample(gm, 16, category=int(labels[0]), priors=priors, seed=0, noise=0.0)
    assert drawn.assignment[f"delta_{top}"].eq(seen).all()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda i, l: (i[0], l), r"images must be \(N, 3, H, W\)"),
        (lambda i, l: (i, l[:1]), r"labels must be \(N,\)"),
        (lambda i, l: (i * float("nan"), l), "NaN"),
    ],
)
def test_bad_inputs_name_the_problem(objects, change, message):
    gm, images, labels = objects
    with pytest.raises(ValueError, match=message):
        fit_offset_priors(gm, *change(images, labels))


def test_bad_options_name_the_problem(objects):
    gm, images, labels = objects
    with pytest.raises(ValueError, match="unknown levels"):
        fit_offset_priors(gm, images, labels, levels=["pool9"])
    with pytest.raises(ValueError, match="concentration must be >= 1"):
        fit_offset_priors(gm, images, labels, concentration=0.5)
