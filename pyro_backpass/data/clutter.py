"""Background clutter: 3-D shapes of no category.

Clutter is made of the same primitives as the objects (boxes, ellipsoids, tubes, cones, flat
polygons, and small assemblies of two or three of them) and is lit and coloured from the same
distributions, so that a parse cannot reject it by its rendering style, only by its shape.
"""

from __future__ import annotations

import numpy as np

from pyro_backpass.data.meshes import normalise
from pyro_backpass.data.primitives import (
    PRIMARY,
    SECONDARY,
    Mesh,
    box,
    concat,
    ellipsoid,
    prism,
    rotation,
    tube_between,
)

__all__ = ["random_clutter_mesh"]


def _piece(rng: np.random.Generator) -> Mesh:
    kind = rng.integers(5)
    dims = rng.uniform(0.15, 1.0, size=3)
    slot = int(rng.choice([PRIMARY, SECONDARY]))
    if kind == 0:
        m = box((0, 0, 0), dims, slot=slot)
    elif kind == 1:
        m = ellipsoid((0, 0, 0), dims / 2, n=10, slot=slot)
    elif kind == 2:
        m = tube_between((-dims[0] / 2, 0, 0), (dims[0] / 2, 0, 0), dims[1] / 4, n=10, slot=slot)
    elif kind == 3:
        m = tube_between(
            (0, 0, -dims[0] / 2), (0, 0, dims[0] / 2), dims[1] / 3, 0.0, n=10, slot=slot
        )
    else:
        # A random convex polygon: sorted angles on an ellipse.
        k = int(rng.integers(3, 7))
        theta = np.sort(rng.uniform(0, 2 * np.pi, k))
        poly = np.column_stack([dims[0] * np.cos(theta), dims[1] * np.sin(theta)]) / 2
        m = prism(poly, 0.03, plane="xy", slot=slot)
    rot = rotation("z", rng.uniform(0, 360)) @ rotation("y", rng.uniform(0, 360))
    return m.transformed(rot @ rotation("x", rng.uniform(0, 360)), rng.uniform(-0.3, 0.3, 3))


def random_clutter_mesh(rng: np.random.Generator) -> Mesh:
    """One normalised clutter mesh: a single primitive, or two or three joined together."""
    n = int(rng.choice([1, 2, 3], p=[0.6, 0.25, 0.15]))
    return normalise(concat([_piece(rng) for _ in range(n)]))
