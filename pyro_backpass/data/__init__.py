"""Rendered data for pyro_backpass: procedural 3-D objects, cluttered scenes, user images.

``DEFAULT_SIZE`` is the side in pixels of every image this package renders unless told
otherwise; ``CATEGORIES`` lists the object categories in label order (a classifier's output
index ``k`` means ``CATEGORIES[k]``).
"""

DEFAULT_SIZE: int = 64
CATEGORIES: tuple[str, ...] = ("airplane", "bird", "boat", "car", "chair")

__all__ = ["CATEGORIES", "DEFAULT_SIZE"]
