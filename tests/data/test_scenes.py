import numpy as np
import pytest
import torch

from pyro_backpass.data import CATEGORIES, render_object
from pyro_backpass.data.scenes import Scenes, make_scene

SETTINGS = [
    {"seed": 0},
    {"seed": 1, "targets": ("airplane",), "distractors": 0, "clutter": False},
    {"seed": 2, "targets": ("airplane", "car", "airplane"), "distractors": 3, "size": 96},
    {"seed": 3, "occlusion": (0.2, 0.5), "distractors": 1},
    {"seed": 4, "targets": ("bird",) * 4, "distractors": 0, "clutter": 8, "occlusion": (0, 0.6)},
]


def _bbox(mask):
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)


@pytest.mark.parametrize("kwargs", SETTINGS)
def test_instance_bookkeeping(kwargs):
    scene = make_scene(**kwargs)
    size = kwargs.get("size", 64)
    lo, hi = kwargs.get("occlusion", (0.0, 0.4))
    assert scene.image.shape == (3, size, size) and scene.image.dtype == torch.float32
    assert 0 <= scene.image.min() and scene.image.max() <= 1
    inst = scene.instances
    targets = kwargs.get("targets", ("airplane", "airplane"))
    n_dis = kwargs.get("distractors", 2)
    assert len(inst) == len(targets) + n_dis  # clutter never adds instances
    assert [i.category for i in inst[: len(targets)]] == list(targets)
    assert all(i.is_target for i in inst[: len(targets)])
    assert all(not i.is_target and i.category not in targets for i in inst[len(targets) :])
    assert sorted(i.depth for i in inst) == list(range(len(inst)))

    occ = []
    for i in inst:
        assert i.mask.dtype == torch.bool and i.mask.shape == (size, size)
        assert i.mask.any() and not (i.mask & ~i.amodal_mask).any()  # amodal contains visible
        # Visible = amodal minus the amodal masks of every instance nearer the camera.
        in_front = [j.amodal_mask for j in inst if j.depth < i.depth]
        hidden = torch.stack(in_front).any(0) if in_front else torch.zeros_like(i.mask)
        assert torch.equal(i.mask, i.amodal_mask & ~hidden)
        expected = 1.0 - i.mask.sum().item() / i.amodal_mask.sum().item()
        assert i.occlusion == pytest.approx(expected, abs=1e-12)
        assert i.box == _bbox(i.mask) and i.amodal_box == _bbox(i.amodal_mask)
        assert i.image_alone.shape == (3, size, size)
        occ.append(i.occlusion)
    assert max(occ) <= hi + 1e-12 and max(occ) >= lo - 1e-12
    front = min(inst, key=lambda i: i.depth)
    assert front.occlusion == 0.0
    # Visible masks of distinct instances are disjoint; clutter pixels belong to none.
    total = torch.stack([i.mask for i in inst]).sum(0)
    assert total.max() <= 1
    amodal_any = torch.stack([i.amodal_mask for i in inst]).any(0)
    assert not (scene.clutter_mask & amodal_any).any()
    if kwargs.get("clutter", True) is False:
        assert not scene.clutter_mask.any()


@pytest.mark.parametrize("kwargs", SETTINGS[:3])
def test_composite_shows_the_nearest_instance(kwargs):
    scene = make_scene(**kwargs)
    inst = scene.instances
    for i in inst:
        # Where i is fully covering and nothing nearer covers at all, the scene shows i alone.
        nearer = [j.alpha for j in inst if j.depth < i.depth]
        clear = torch.stack(nearer).amax(0) == 0 if nearer else torch.ones_like(i.mask)
        solid = (i.alpha == 1.0) & clear
        assert solid.sum() > 0
        assert torch.equal(scene.image[:, solid], i.image_alone[:, solid])
        # Off the object, its lone image is the plain background.
        bg = torch.round(torch.tensor(scene.background) * 255) / 255
        off = i.alpha == 0
        assert torch.allclose(i.image_alone[:, off], bg[:, None].expand(3, int(off.sum())))
    if kwargs.get("clutter", True) is False:
        nothing = torch.stack([i.alpha for i in inst]).amax(0) == 0
        assert torch.equal(scene.image[:, nothing], inst[0].image_alone[:, nothing])


def test_instance_params_render_the_instance_at_its_place():
    scene = make_scene(seed=7)
    for i in scene.instances:
        again = render_object(i.params)
        assert i.params.centre != (32.0, 32.0)
        differs = (again.mask != i.amodal_mask).float().mean()
        assert differs < 0.005


def test_scenes_are_deterministic_and_indexable():
    a, b = make_scene(seed=5), make_scene(seed=5)
    assert torch.equal(a.image, b.image)
    assert [i.occlusion for i in a.instances] == [i.occlusion for i in b.instances]
    assert not torch.equal(a.image, make_scene(seed=6).image)
    ds = Scenes(3, seed=2, distractors=1, clutter=False)
    assert len(ds) == 3
    assert torch.equal(ds[1].image, make_scene(distractors=1, clutter=False, seed=(2, 1)).image)
    assert not torch.equal(ds[0].image, ds[1].image)
    with pytest.raises(IndexError, match="out of range"):
        ds[3]


def test_positions_are_continuous():
    centres = [i.params.centre for s in range(4) for i in make_scene(seed=s).instances]
    fractions = np.array(centres) % 1.0
    assert len(np.unique(np.round(fractions, 6))) > 10


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"targets": ("zebra",)}, ValueError, "unknown category 'zebra'.*airplane"),
        ({"targets": ()}, ValueError, "1 to 4"),
        ({"targets": ("car",) * 5}, ValueError, "1 to 4"),
        ({"distractors": 5}, ValueError, r"distractors must be in \[0, 4\]"),
        ({"distractors": -1}, ValueError, "distractors must be"),
        ({"distractors": ["dragon"]}, ValueError, "unknown category 'dragon'"),
        ({"occlusion": (0.5, 0.2)}, ValueError, "occlusion must satisfy"),
        ({"occlusion": (-0.1, 0.2)}, ValueError, "occlusion must satisfy"),
        ({"occlusion": (0.0, 1.0)}, ValueError, "occlusion must satisfy"),
        ({"occlusion": "lots"}, ValueError, "occlusion must be a pair"),
        ({"size": 10}, ValueError, "size must be in"),
        ({"clutter": -2}, ValueError, "clutter must be"),
        ({"seed": -3}, ValueError, "seed must be"),
        (
            {"targets": ("car",), "distractors": 0, "occlusion": (0.1, 0.3)},
            ValueError,
            "at least two objects",
        ),
        (
            {"targets": CATEGORIES[:4], "distractors": 0, "occlusion": (0.9, 0.95), "max_tries": 5},
            ValueError,
            "could not place 4 objects",
        ),
    ],
)
def test_bad_scene_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_scene(**kwargs)


def test_scenes_check_options_up_front():
    with pytest.raises(TypeError, match="unknown scene options"):
        Scenes(2, occlusions=(0, 1))
    with pytest.raises(ValueError, match="occlusion must satisfy"):
        Scenes(2, occlusion=(0.6, 0.1))
    with pytest.raises(ValueError, match="n must be >= 0"):
        Scenes(-1)
    with pytest.raises(ValueError, match="seed must be"):
        Scenes(2, seed=-1)
    with pytest.raises(ValueError, match="at least two objects"):
        Scenes(2, targets=("car",), distractors=0, occlusion=(0.2, 0.4))
