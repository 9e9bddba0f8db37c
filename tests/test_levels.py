import pytest

from pyro_backpass import level_names, levels_from_cfg, levels_up_to


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


@pytest.mark.parametrize("cfg", [[4, 4, "M", 8, "M", 8, "M"], [3, "M"]])
def test_levels_up_to_equals_the_levels_of_the_network_that_ends_there(cfg):
    """Cutting at a level gives the levels of the cfg's prefix up to it (an independent
    construction), with the category on top."""
    full = levels_from_cfg(cfg, image_size=16, num_categories=3)
    for i, name in enumerate(level_names(cfg)):
        shorter = levels_from_cfg(cfg[: i + 1], image_size=16, num_categories=3)
        assert levels_up_to(full, name) == shorter, name


def test_levels_up_to_names_the_valid_levels():
    full = levels_from_cfg([4, "M", 8, "M"], image_size=16, num_categories=2)
    for bad in ("pool3", "image", "category", "pool_1"):
        with pytest.raises(ValueError, match=r"choose one of \['conv1_1', 'pool1', 'conv2_1'"):
            levels_up_to(full, bad)
    with pytest.raises(ValueError, match="'image' level up to a 'category'"):
        levels_up_to(full[:-1], "pool1")
