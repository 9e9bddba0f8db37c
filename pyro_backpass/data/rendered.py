"""Rendered data as in-memory tensors, for training and scoring backbones.

Rendering is the slow part of a naive loader, so a training run renders its objects (and, for
the compositional objective, its scenes with every object rendered alone at the same place)
once into stacked tensors and then runs epochs over memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from pyro_backpass.data.objects import RenderedObjects
from pyro_backpass.data.scenes import make_scene

__all__ = ["ScenePairs", "render_objects", "render_scene_pairs"]


@dataclass(frozen=True)
class ScenePairs:
    """Scenes and, for each object in them, the object rendered alone at the same place.

    ``scenes (S, 3, H, W)``; ``objects (O, 3, H, W)``; ``masks`` (visible, in the scene) bool
    ``(O, H, W)``; ``labels (O,)`` category indices; ``scene_index (O,)`` into ``scenes``.
    """

    scenes: Tensor
    objects: Tensor
    masks: Tensor
    labels: Tensor
    scene_index: Tensor


def render_objects(
    categories: Sequence[str], n: int, *, size: int, seed: int, progress: bool = False
) -> tuple[Tensor, Tensor]:
    """``n`` rendered objects per category: images ``(K·n, 3, H, W)``, labels ``(K·n,)``."""
    images, labels = [], []
    bar = tqdm(total=len(categories) * n, desc="render objects", disable=not progress)
    for k, cat in enumerate(categories):
        # Items are seeded by (seed, category, index), so categories never share a draw.
        ds = RenderedObjects(cat, n, size=size, seed=seed)
        for i in range(n):
            images.append(ds[i][0])
            bar.update(1)
        labels += [k] * n
    bar.close()
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def render_scene_pairs(
    n: int,
    *,
    categories: Sequence[str],
    size: int,
    seed: int,
    distractors: tuple[int, int] = (1, 3),
    occlusion: tuple[float, float] = (0.0, 0.3),
    progress: bool = False,
) -> ScenePairs:
    """``n`` cluttered scenes, one target of each category in turn plus distractors.

    Every instance (target or distractor) becomes one object; objects whose visible mask is
    empty are dropped.
    """
    gen = torch.Generator().manual_seed(seed)
    scenes, objects, masks, labels, scene_index = [], [], [], [], []
    for s in tqdm(range(n), desc="render scenes", disable=not progress):
        n_distractors = int(torch.randint(distractors[0], distractors[1] + 1, (), generator=gen))
        scene = make_scene(
            targets=(categories[s % len(categories)],),
            distractors=n_distractors,
            clutter=True,
            occlusion=occlusion,
            size=size,
            seed=(seed, s),
        )
        scenes.append(scene.image)
        for inst in scene.instances:
            if inst.category not in categories or not inst.mask.any():
                continue
            objects.append(inst.image_alone)
            masks.append(inst.mask)
            labels.append(categories.index(inst.category))
            scene_index.append(s)
    return ScenePairs(
        scenes=torch.stack(scenes),
        objects=torch.stack(objects),
        masks=torch.stack(masks),
        labels=torch.tensor(labels, dtype=torch.long),
        scene_index=torch.tensor(scene_index, dtype=torch.long),
    )
