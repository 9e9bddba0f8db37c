"""fit_offset_priors against per-object backward passes counted by hand."""

from __future__ import annotations

import pytest
import torch

from pyro_backpass import GenerativeModel, RenderedObjects, fit_offset_priors, greedy_map, sample


@pytest.fixture(scope="module")
def objects():
    """Four lone objects moved off the centre by different amounts (on their plain
    background), so that the pass picks different offsets on several levels."""
    gm = GenerativeModel.default()
    pairs = [RenderedObjects(cat, 2, seed=11)[i] for cat in ("airplane", "car") for i in range(2)]
    shifts = [(0, 0), (0, 12), (12, 0), (-12, -12)]
    images = torch.stack([torch.roll(image, shifts=shift, dims=(1, 2))
                          for (image, _), shift in zip(pairs, shifts, strict=True)])  # fmt: skip
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
    # the fixture is informative: some level saw several offsets (else a bug that always
    # counted one offset, or swapped levels, could pass)
    assert max(int((c > 0).sum()) for c in counts.values()) >= 3
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
        (lambda i, l: (i[0], l), r"images must be a \(N, 3, H, W\) tensor"),
        (lambda i, l: (i, l[:1]), r"labels must be \(N,\)"),
        (lambda i, l: (i * float("nan"), l), "NaN"),
        (lambda i, l: (i[:0], l[:0]), "at least one image"),
        (lambda i, l: (i, l.float()), "integer category indices"),
        (lambda i, l: (i, l + 10), r"labels must lie in \[0, 5\)"),
        (lambda i, l: (i, ["airplane", "ship", "car", "car"]), r"unknown categories \['ship'\]"),
    ],
)
def test_bad_inputs_name_the_problem(objects, change, message):
    gm, images, labels = objects
    with pytest.raises(ValueError, match=message):
        fit_offset_priors(gm, *change(images, labels))


def test_category_names_are_the_same_labels(objects):
    gm, images, labels = objects
    names = [gm.categories[int(i)] for i in labels]
    by_name = fit_offset_priors(gm, images, names, levels=["pool4"])
    by_index = fit_offset_priors(gm, images, labels, levels=["pool4"])
    torch.testing.assert_close(by_name["delta_pool4"].probs, by_index["delta_pool4"].probs)


def test_bad_options_name_the_problem(objects):
    gm, images, labels = objects
    with pytest.raises(ValueError, match="unknown levels"):
        fit_offset_priors(gm, images, labels, levels=["pool9"])
    with pytest.raises(ValueError, match="concentration must be >= 1"):
        fit_offset_priors(gm, images, labels, concentration=0.5)
    with pytest.raises(ValueError, match="a list of level names"):
        fit_offset_priors(gm, images, labels, levels="pool4")
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        fit_offset_priors(gm, images, labels, batch_size=2.5)
