"""The user's own images: a folder of RGBA PNGs as objects, a folder of plain images as scenes.

Objects: each PNG's alpha channel is the object's mask. The image is padded to a square with
transparent pixels (keeping its aspect), resized to ``size`` with premultiplied alpha (so the
background colour does not bleed into the edges), and composited onto a plain ``background``,
like the rendered objects. Scenes: each image is centre-cropped to a square and resized.

Files are checked when the folder is opened (readable image, alpha present); a file that only
fails when decoded (a truncated PNG) raises when its item is read. Every error names the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from pyro_backpass.data.checks import check_size
from pyro_backpass.data.constants import DEFAULT_SIZE

__all__ = ["ObjectFolder", "SceneFolder", "load_scene_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _list(root: str | Path, suffixes: Sequence[str], what: str) -> list[Path]:
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{what} folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{what} folder {root} is not a directory")
    paths = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not paths:
        raise ValueError(f"{what} folder {root} holds no files ending in {', '.join(suffixes)}")
    return paths


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:  # closes the file even when decoding fails
            img.load()
            return img.copy()
    except (OSError, UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "RGBa", "La", "PA") or "transparency" in img.info


def _to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` float in [0, 1] -> ``(3, H, W)`` float32."""
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32))


class ObjectFolder(Dataset):
    """RGBA PNGs as objects: ``[i] -> (image (3, H, W) float32 in [0, 1], mask (H, W) bool)``.

    :param root: folder of ``*.png`` files (sorted by name; ``self.paths``).
    :param size: output side in pixels.
    :param background: RGB in [0, 1] the object is composited onto.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        size: int = DEFAULT_SIZE,
        background: Sequence[float] = (0.5, 0.5, 0.5),
    ) -> None:
        self.size = check_size(size)
        bg = np.asarray(background, dtype=np.float64)
        if bg.shape != (3,) or not np.all((bg >= 0) & (bg <= 1)):
            raise ValueError(f"background must be 3 numbers in [0, 1], got {background!r}")
        self.background = bg
        self.paths = _list(root, (".png",), "object")
        for p in self.paths:
            try:
                with Image.open(p) as img:
                    alpha = _has_alpha(img)
                    mode = img.mode
            except (OSError, UnidentifiedImageError) as e:
                raise ValueError(f"cannot read image {p}: {e}") from None
            if not alpha:
                raise ValueError(
                    f"{p} has no alpha channel (mode {mode}); object PNGs need "
                    "RGBA, with alpha as the object's mask"
                )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path = self.paths[i]
        img = _open(path).convert("RGBA")
        w, h = img.size
        side = max(w, h)
        square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        # Resize premultiplied, so transparent pixels' colours do not bleed into the edge.
        small = square.convert("RGBa").resize((self.size, self.size), Image.Resampling.BILINEAR)
        a = np.asarray(small, dtype=np.float64) / 255.0  # (H, W, 4) premultiplied
        alpha = a[..., 3]
        if not (alpha >= 0.5).any():
            raise ValueError(f"{path} has an empty mask (alpha < 0.5 everywhere at {self.size} px)")
        rgb = a[..., :3] + (1.0 - alpha[..., None]) * self.background
        rgb = np.round(np.clip(rgb, 0, 1) * 255) / 255
        return _to_tensor(rgb), torch.from_numpy(alpha >= 0.5)


def load_scene_image(path: str | Path, *, size: int = DEFAULT_SIZE) -> torch.Tensor:
    """One image as a scene: centre-cropped to a square, resized, ``(3, size, size)`` in [0, 1]."""
    size = check_size(size)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scene image {path} does not exist")
    img = _open(path)
    if _has_alpha(img):
        # Transparent pixels of a scene image show white, not whatever colour they hold.
        img = img.convert("RGBA")
        flat = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(flat, img)
    img = img.convert("RGB")
    w, h = img.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return _to_tensor(np.asarray(img, dtype=np.float64) / 255.0)


class SceneFolder(Dataset):
    """Plain images as scenes: ``[i] -> image (3, H, W) float32 in [0, 1]`` (see
    :func:`load_scene_image`); ``self.paths`` lists the files, sorted by name."""

    def __init__(self, root: str | Path, *, size: int = DEFAULT_SIZE) -> None:
        self.size = check_size(size)
        self.paths = _list(root, IMAGE_SUFFIXES, "scene")
        for p in self.paths:
            try:
                with Image.open(p):
                    pass
            except (OSError, UnidentifiedImageError) as e:
                raise ValueError(f"cannot read image {p}: {e}") from None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return load_scene_image(self.paths[i], size=self.size)
