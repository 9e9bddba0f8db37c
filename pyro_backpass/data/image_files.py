"""A folder of images of any size and mode, read for batch parsing: ``[i]`` never raises.

Every file under the folder (recursively) whose name ends in an image suffix is an item, named
by its path relative to the folder (``image_id``, POSIX separators) and sorted by that name, so
the order is the same on every machine and every rank. A file that cannot be decoded gives an
item with ``image=None`` and the reason in ``error``: a batch run reports it and goes on.
Images are converted to RGB (grey expanded, transparency composited onto white, as
:func:`~pyro_backpass.data.load_scene_image` does) and kept at their own size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from pyro_backpass.data.user_data import IMAGE_SUFFIXES, load_rgb

__all__ = ["ImageFiles", "ImageItem", "list_image_ids"]


@dataclass(frozen=True)
class ImageItem:
    """One file of an :class:`ImageFiles` folder: the image or the reason it has none."""

    image_id: str  # the path relative to the folder, POSIX separators
    image: torch.Tensor | None  # (3, H, W) float32 in [0, 1], None when unreadable
    error: str | None = None  # why the file could not be read


class ImageFiles(Dataset):
    """Images under ``root``, sorted by ``image_id``; ``ids`` gives a subset of them instead
    (one rank's shard, or what a resumed run has left)."""

    def __init__(self, root: str | Path, *, ids: list[str] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"image folder {self.root} does not exist or is not a folder")
        self.ids = sorted(ids) if ids is not None else list_image_ids(self.root)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> ImageItem:
        image_id = self.ids[i]
        try:
            rgb = load_rgb(self.root / image_id)
        except Exception as err:  # unreadable, truncated, vanished, a decompression bomb: any
            return ImageItem(image_id, None, f"{type(err).__name__}: {err}")  # is a bad file
        array = np.asarray(rgb, dtype=np.float32) / 255.0  # (H, W, 3)
        return ImageItem(image_id, torch.from_numpy(array.transpose(2, 0, 1).copy()))


def list_image_ids(root: Path) -> list[str]:
    """Every image file under ``root`` as a relative POSIX path, sorted."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
