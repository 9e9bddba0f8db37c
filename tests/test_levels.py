import pytest

from pyro_backpass import level_names, levels_from_cfg


def test_names_follow_vgg_convention():
    assert level_names([4, 4, "M", 8, "M", 8]) == [
        "conv1_1",
        "conv1_2",
        "pool1",
        "conv2_1",
        "pool2",
        "conv3_1",
    ]


def test_shapes_bottom_to_top():
    specs = levels_from_cfg([4, "M", 8, "M"], image_size=16, num_categories=3)
    assert [s.name for s in specs] == ["image", "conv1_1", "pool1", "conv2_1", "pool2", "category"]
    assert [s.shape for s in specs] == [
        (3, 16, 16),
        (4, 16, 16),
        (4, 8, 8),
        (8, 8, 8),
        (8, 4, 4),
        (3, 1, 1),
    ]


@pytest.mark.parametrize("cfg", [[], ["M"], [4, "M", "M"], [0], [4, "X"], [True]])
def test_bad_cfg_is_named(cfg):
    with pytest.raises(ValueError, match="cfg"):
        level_names(cfg)


def test_too_small_image():
    with pytest.raises(ValueError, match="too small"):
        levels_from_cfg([4, "M", 4, "M"], image_size=2, num_categories=1)
