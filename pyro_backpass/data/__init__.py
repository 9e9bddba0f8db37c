"""Rendered data for pyro_backpass: procedural 3-D objects, cluttered scenes, user images.

``CATEGORIES`` lists the object categories in label order (a classifier's output index ``k``
means ``CATEGORIES[k]``). ``DEFAULT_SIZE`` is the side in pixels of every image this package
renders unless told otherwise: 64 px (provisional; see ``benchmarks/image_size.py``).
"""

from pyro_backpass.data._constants import CATEGORIES, DEFAULT_SIZE
from pyro_backpass.data.objects import (
    OBJECT_SCALE,
    ObjectDataset,
    ObjectParams,
    ObjectRender,
    RenderedObjects,
    render_object,
    sample_object_params,
)
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
    "Scene",
    "SceneFolder",
    "Scenes",
    "load_scene_image",
    "make_scene",
    "render_object",
    "sample_object_params",
]
