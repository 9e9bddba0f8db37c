"""Rendered data for pyro_backpass: procedural 3-D objects, cluttered scenes, user images, and
rendered sets as in-memory tensors (for training backbones and models).

``CATEGORIES`` lists the object categories in label order (a classifier's output index ``k``
means ``CATEGORIES[k]``). ``DEFAULT_SIZE`` is the side in pixels of every image this package
renders unless told otherwise.

Why 64 px (``benchmarks/image_size.py``, results in ``benchmarks/results/image_size.json``):
in a scene of three objects (two airplanes, one distractor, clutter) an object's longest side
is about 25 px at 64, 31 at 80, 37 at 96 and 50 at 128 (median). A small CNN trained for the
same budget on objects rendered at exactly those pixel sizes reaches the same held-out
accuracy at all four (92.4, 92.0, 92.6, 89.2 %), so 25 px objects are already as
recognisable as larger ones, while every cost grows with the pixel count: rendering (3 ms per
object and 12 ms per scene at 64 px, several times that at 128, measured on the shared 2-core
machine), and the backbone's training and forward passes (x2.25 at 96, x4 at 128). 64 px is
therefore the smallest size that keeps 2-3 objects recognisable. The price: such an object
spans only about 1.6 cells of a stride-16 (pool4) map; pass ``size=96`` (2.3 cells) where the
top level must resolve positions within an object.
"""

from pyro_backpass.data.constants import CATEGORIES, DEFAULT_SIZE, SPLIT_SEED_OFFSETS, split_seed
from pyro_backpass.data.objects import (
    OBJECT_SCALE,
    ObjectDataset,
    ObjectParams,
    ObjectRender,
    RenderedObjects,
    render_object,
    sample_object_params,
)
from pyro_backpass.data.rendered import ScenePairs, render_objects, render_scene_pairs
from pyro_backpass.data.scenes import SCENE_SCALE, Instance, Scene, Scenes, make_scene
from pyro_backpass.data.user_data import ObjectFolder, SceneFolder, load_scene_image

__all__ = [
    "CATEGORIES",
    "DEFAULT_SIZE",
    "Instance",
    "OBJECT_SCALE",
    "ObjectDataset",
    "ObjectFolder",
    "ObjectParams",
    "ObjectRender",
    "RenderedObjects",
    "SCENE_SCALE",
    "SPLIT_SEED_OFFSETS",
    "Scene",
    "SceneFolder",
    "ScenePairs",
    "Scenes",
    "load_scene_image",
    "make_scene",
    "render_object",
    "render_objects",
    "render_scene_pairs",
    "sample_object_params",
    "split_seed",
]
