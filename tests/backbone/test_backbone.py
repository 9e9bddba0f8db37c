"""Backbone interface: names, shapes, order, equality with torchvision, save/load, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.models import vgg as tv_vgg
from torchvision.models.feature_extraction import create_feature_extractor

from pyro_backpass.backbone import Activations, Backbone, SmallVGG, downsample_mask

CFG = [8, "M", 16, 16, "M", 16, "M"]
CATS = ["airplane", "boat", "car"]

# torchvision's VGG16 `features` indices of the ReLU after each conv and of each pool, written
# out by hand from torchvision's layer list: an oracle independent of our level loop.
VGG16_NODES = {
    "1": "conv1_1", "3": "conv1_2", "4": "pool1",
    "6": "conv2_1", "8": "conv2_2", "9": "pool2",
    "11": "conv3_1", "13": "conv3_2", "15": "conv3_3", "16": "pool3",
    "18": "conv4_1", "20": "conv4_2", "22": "conv4_3", "23": "pool4",
    "25": "conv5_1", "27": "conv5_2", "29": "conv5_3", "30": "pool5",
}  # fmt: skip


def small_backbone(image_size: int = 32) -> Backbone:
    net = SmallVGG(CFG, num_classes=len(CATS))
    return Backbone.from_small_vgg(
        net, categories=CATS, image_size=image_size, mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3]
    )


@pytest.mark.parametrize("size", [32, 40])
def test_small_vgg_names_shapes_order(size):
    bb = small_backbone()
    acts = bb(torch.rand(2, 3, size, size))
    assert isinstance(acts, Activations)
    assert list(acts) == ["image", "conv1_1", "pool1", "conv2_1", "conv2_2", "pool2"] + [
        "conv3_1",
        "pool3",
    ]
    expected = {
        "image": (3, size, size),
        "conv1_1": (8, size, size),
        "pool1": (8, size // 2, size // 2),
        "conv2_2": (16, size // 2, size // 2),
        "pool2": (16, size // 4, size // 4),
        "pool3": (16, size // 8, size // 8),
    }
    for name, shape in expected.items():
        assert tuple(acts[name].shape) == (2, *shape)
        assert acts.spec(name).shape == shape
    # Conv levels are read after the ReLU.
    assert all(acts[n].min() >= 0 for n in acts if n != "image")
    assert [s.name for s in bb.levels][-1] == "category"
    assert bb.levels[-1].channels == 3
    assert bb.levels[0].shape == (3, 32, 32)


def test_small_vgg_levels_equal_torchvision_feature_extractor():
    bb = small_backbone()
    x = torch.rand(3, 3, 32, 32)
    # The same stack read by torchvision's FX extractor: ReLU after each conv and each pool.
    nodes = {"1": "conv1_1", "2": "pool1", "4": "conv2_1", "6": "conv2_2", "7": "pool2"}
    nodes |= {"9": "conv3_1", "10": "pool3"}
    extractor = create_feature_extractor(bb.features, return_nodes=nodes)
    ref = extractor((x - bb.mean) / bb.std)
    acts = bb(x)
    for name in nodes.values():
        torch.testing.assert_close(acts[name], ref[name])
    torch.testing.assert_close(acts["image"], x)
    # The head is a global average pool + linear on the last pool.
    logits = bb.logits(acts)
    w, b = bb.head.linear.weight, bb.head.linear.bias
    torch.testing.assert_close(logits, ref["pool3"].mean((2, 3)) @ w.T + b)


def test_vgg16_random_names_shapes_and_torchvision_equality(tmp_path):
    torch.manual_seed(1)
    tv_features = tv_vgg.make_layers(tv_vgg.cfgs["D"])  # torchvision's own VGG16 stack
    path = tmp_path / "vgg16_features.pth"
    torch.save(tv_features.state_dict(), path)
    bb = Backbone.vgg16(weights=path)
    assert bb.categories == ()
    assert [s.name for s in bb.levels] == ["image"] + list(VGG16_NODES.values())
    x = torch.rand(1, 3, 224, 224)
    extractor = create_feature_extractor(tv_features, return_nodes=VGG16_NODES)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = extractor((x - mean) / std)
        acts = bb(x)
    assert list(acts) == ["image"] + list(VGG16_NODES.values())
    assert tuple(acts["pool5"].shape) == (1, 512, 7, 7)
    assert tuple(acts["conv5_3"].shape) == (1, 512, 14, 14)
    assert tuple(acts["conv1_1"].shape) == (1, 64, 224, 224)
    for name in VGG16_NODES.values():
        torch.testing.assert_close(acts[name], ref[name])
    with pytest.raises(ValueError, match="features-only"):
        bb.predict(x)


def test_vgg16_full_state_dict_and_cache(tmp_path, monkeypatch):
    torch.manual_seed(2)
    tv_features = tv_vgg.make_layers(tv_vgg.cfgs["D"])
    full = {f"features.{k}": v for k, v in tv_features.state_dict().items()}
    full["classifier.0.weight"] = torch.zeros(2, 2)  # stands in for the (large) fc layers
    torch.save(full, tmp_path / "vgg16_full.pth")
    bb = Backbone.vgg16(weights=tmp_path / "vgg16_full.pth")
    torch.testing.assert_close(bb.features[28].weight, tv_features[28].weight)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="not in the torch hub cache"):
        Backbone.vgg16(weights="cache")
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(full, tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth")
    bb = Backbone.vgg16(weights="cache")
    torch.testing.assert_close(bb.features[0].bias, tv_features[0].bias)


def test_vgg16_random_init_differs_and_is_finite():
    bb = Backbone.vgg16()
    acts = bb(torch.rand(1, 3, 32, 32))
    assert tuple(acts["pool5"].shape) == (1, 512, 1, 1)
    assert torch.isfinite(acts["pool5"]).all()


def test_save_load_round_trip(tmp_path):
    bb = small_backbone()
    bb.info["note"] = "round trip"
    path = bb.save(tmp_path / "bb")
    assert path.suffix == ".safetensors" and path.with_suffix(".json").exists()
    config = json.loads(path.with_suffix(".json").read_text())
    assert config["format_version"] == 1 and config["cfg"] == CFG
    assert config["categories"] == CATS and config["image_size"] == [32, 32]
    loaded = Backbone.load(tmp_path / "bb.json")
    x = torch.rand(2, 3, 32, 32)
    a, b = bb(x), loaded(x)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    torch.testing.assert_close(loaded.mean, bb.mean)
    assert loaded.categories == tuple(CATS) and loaded.info["note"] == "round trip"
    assert loaded.predict(x).dtype == torch.long


def test_downsample_mask_is_area_fraction():
    mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    mask[0, :4, :2] = True  # a quarter of each of the two left cells of the top row at 2x2
    small = downsample_mask(mask, (2, 2))
    torch.testing.assert_close(small, torch.tensor([[[0.5, 0.0], [0.0, 0.0]]]))
    assert downsample_mask(mask, (8, 8)).sum() == mask.sum()


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "images, err, match",
    [
        (torch.rand(3, 32, 32), ValueError, "unsqueeze"),
        (torch.rand(2, 1, 32, 32), ValueError, "3 \\(RGB\\) channels"),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), TypeError, "divide by 255"),
        (torch.rand(2, 3, 32, 32, dtype=torch.float64), TypeError, "float64"),
        (torch.rand(2, 3, 4, 4), ValueError, "too small"),
        (torch.full((1, 3, 32, 32), float("nan")), ValueError, "NaN or inf"),
        (torch.full((1, 3, 32, 32), float("inf")), ValueError, "NaN or inf"),
        (torch.rand(1, 3, 32, 32) * 255, ValueError, "\\[0, 1\\]"),
        (torch.rand(1, 3, 32, 32) - 0.5, ValueError, "\\[0, 1\\]"),
        ([[0.5]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_images(images, err, match):
    with pytest.raises(err, match=match):
        small_backbone()(images)


def test_unknown_category():
    bb = small_backbone()
    assert bb.category_index("boat") == 1
    with pytest.raises(KeyError, match="unknown category 'zebra'"):
        bb.category_index("zebra")


def test_corrupt_and_truncated_checkpoint(tmp_path):
    path = small_backbone().save(tmp_path / "bb")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt, truncated"):
        Backbone.load(path)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupt, truncated"):
        Backbone.load(path)
    path.write_bytes(data)
    cfg_path = path.with_suffix(".json")
    cfg_path.write_text(cfg_path.read_text()[:40])
    with pytest.raises(ValueError, match="not valid JSON"):
        Backbone.load(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Backbone.load(tmp_path / "nope.safetensors")


def test_checkpoint_with_wrong_architecture(tmp_path):
    path = small_backbone().save(tmp_path / "bb")
    cfg_path = path.with_suffix(".json")
    config = json.loads(cfg_path.read_text())
    # A config that claims another cfg than the tensors hold.
    cfg_path.write_text(json.dumps({**config, "cfg": [8, "M", 32, "M"]}))
    with pytest.raises(ValueError, match="another architecture"):
        Backbone.load(path)
    cfg_path.write_text(json.dumps({**config, "architecture": "resnet18"}))
    with pytest.raises(ValueError, match="resnet18"):
        Backbone.load(path)
    cfg_path.write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ValueError, match="format version 99"):
        Backbone.load(path)
    # A SmallVGG checkpoint handed to the VGG16 loader, and a torch file handed to load().
    with pytest.raises(ValueError, match="not for VGG16 features"):
        Backbone.vgg16(weights=path)
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="Backbone.vgg16"):
        Backbone.load(tmp_path / "x.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="could not read weights file"):
        Backbone.vgg16(weights=tmp_path / "junk.pth")
