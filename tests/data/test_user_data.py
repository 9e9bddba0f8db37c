import numpy as np
import pytest
import torch
from PIL import Image

from pyro_backpass.data.user_data import ObjectFolder, SceneFolder, load_scene_image


def _rgba(path, w=40, h=20, box=(4, 8, 16, 32), colour=(255, 0, 0)):
    """A transparent image with an opaque rectangle at rows box[0]:box[2], cols box[1]:box[3];
    transparent pixels hold green so any bleeding would show."""
    a = np.zeros((h, w, 4), np.uint8)
    a[..., 1] = 255
    r0, c0, r1, c1 = box
    a[r0:r1, c0:c1, :3] = colour
    a[r0:r1, c0:c1, 3] = 255
    Image.fromarray(a, "RGBA").save(path)


def test_rgba_folder_as_objects(tmp_path):
    _rgba(tmp_path / "b.png")
    _rgba(tmp_path / "a.png", w=16, h=16, box=(0, 0, 16, 16), colour=(0, 0, 255))
    (tmp_path / "notes.txt").write_text("ignored")
    ds = ObjectFolder(tmp_path, size=32, background=(0.0, 0.0, 0.0))
    assert [p.name for p in ds.paths] == ["a.png", "b.png"] and len(ds) == 2
    image, mask = ds[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert mask.shape == (32, 32) and mask.dtype == torch.bool
    # 40x20 padded to 40x40 (rows shift by 10) then scaled by 0.8: the opaque rectangle
    # rows 14:26, cols 8:32 lands on rows 11.2:20.8, cols 6.4:25.6.
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[11:21, 6:26] = True
    assert (mask ^ expected).sum() <= 2 * (10 + 20)  # at most the boundary pixels differ
    assert mask[13:19, 8:24].all() and not mask[:9].any() and not mask[23:].any()
    assert torch.equal(image[:, 15, 15], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(image[:, 2, 2], torch.zeros(3))  # background, no green bleeding
    assert image[1].max() < 0.05
    image_a, mask_a = ds[0]
    assert mask_a.all() and torch.equal(image_a[:, 5, 5], torch.tensor([0.0, 0.0, 1.0]))


def test_object_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ObjectFolder(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        ObjectFolder(tmp_path / "file.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no pngs")
    with pytest.raises(ValueError, match="holds no files ending in .png"):
        ObjectFolder(empty)

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "x.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*x\.png"):
        ObjectFolder(garbage)

    rgb = tmp_path / "rgb"
    rgb.mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(rgb / "flat.png")
    with pytest.raises(ValueError, match=r"flat\.png has no alpha channel"):
        ObjectFolder(rgb)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    _rgba(truncated / "t.png", w=64, h=64, box=(5, 5, 60, 60))
    data = (truncated / "t.png").read_bytes()
    (truncated / "t.png").write_bytes(data[: len(data) // 2])
    ds = ObjectFolder(truncated)  # the header reads fine
    with pytest.raises(ValueError, match=r"cannot read image .*t\.png"):
        ds[0]

    clear = tmp_path / "clear"
    clear.mkdir()
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(clear / "c.png")
    with pytest.raises(ValueError, match="empty mask"):
        ObjectFolder(clear, size=16)[0]
    with pytest.raises(ValueError, match="background must be"):
        ObjectFolder(clear, background=(2.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="size must be in"):
        ObjectFolder(clear, size=4)


def test_plain_images_as_scenes(tmp_path):
    a = np.zeros((30, 50, 3), np.uint8)
    a[:, 25:] = 255  # left half black, right half white
    Image.fromarray(a).save(tmp_path / "s.png")
    Image.fromarray(a).save(tmp_path / "s2.jpg", quality=95)
    ds = SceneFolder(tmp_path, size=16)
    assert len(ds) == 2
    for i in range(2):
        image = ds[i]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        # The centre crop (cols 10:40) is half black, half white.
        assert image[:, :, :7].max() < 0.1 and image[:, :, 9:].min() > 0.9
    rgba = np.zeros((20, 20, 4), np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert torch.equal(load_scene_image(tmp_path / "clear.png", size=16), torch.ones(3, 16, 16))


def test_scene_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no files"):
        SceneFolder(tmp_path)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 nope")
    with pytest.raises(ValueError, match=r"cannot read image .*bad\.jpg"):
        SceneFolder(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_scene_image(tmp_path / "nothing.png")
    with pytest.raises(ValueError, match="cannot read image"):
        load_scene_image(tmp_path / "bad.jpg")
