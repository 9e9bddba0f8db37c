"""Render a mesh: orthographic camera, flat Lambertian + ambient shading, supersampled coverage.

The camera looks at the object from azimuth ``a`` (about the vertical axis; 0 sees the front)
and elevation ``e`` (above the horizon). The scale is the image size of the object's bounding
sphere, so a normalised mesh rendered at ``scale = f`` never leaves a circle of diameter
``f * size`` about its centre, whatever the view.

Thin parts (wings, sails, fins) are single sheets of triangles with either winding, so shading
is two-sided: every normal is turned to face the camera before lighting. Coverage is computed
on a ``supersample``-times finer grid and averaged, which gives soft edges (``alpha``) that
scenes use for compositing; the binary mask is ``alpha >= 0.5``. Images are rounded to 8-bit
levels so that an on-disk cache in ``uint8`` reproduces them exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pyro_backpass.data.primitives import Mesh, rotation
from pyro_backpass.data.raster import rasterize

__all__ = ["Layer", "render_mesh"]


@dataclass(frozen=True)
class Layer:
    """One rendered mesh, not yet composited.

    :param colour: ``(H, W, 3)`` float64 shaded colour where covered (0 elsewhere), not
        premultiplied.
    :param alpha: ``(H, W)`` float64 coverage in [0, 1].
    """

    colour: np.ndarray
    alpha: np.ndarray

    def over(self, below: np.ndarray) -> np.ndarray:
        """Composite onto ``below`` ``(H, W, 3)``."""
        a = self.alpha[..., None]
        return a * self.colour + (1.0 - a) * below


def render_mesh(
    mesh: Mesh,
    *,
    size: int,
    azimuth: float,
    elevation: float,
    scale: float,
    centre: Sequence[float],
    light: Sequence[float],
    ambient: float,
    colours: np.ndarray,
    supersample: int = 2,
) -> Layer:
    """Render ``mesh`` into a ``size`` x ``size`` layer.

    :param azimuth: degrees about the vertical axis.
    :param elevation: degrees above the horizon.
    :param scale: diameter of the unit sphere in the image, as a fraction of ``size``.
    :param centre: ``(row, col)`` of the object's origin, in pixels (continuous).
    :param light: ``(azimuth, elevation)`` of the light in degrees, in the camera's frame
        (``(0, 0)`` shines along the viewing direction).
    :param colours: ``(S, 3)`` RGB albedo per colour slot.
    """
    ss = supersample
    hi = size * ss
    el = np.deg2rad(elevation)
    # Camera basis in the yawed object frame: image right, image up, towards the camera.
    right = np.array([0.0, 1.0, 0.0])
    up = np.array([-np.sin(el), 0.0, np.cos(el)])
    toward = np.array([np.cos(el), 0.0, np.sin(el)])
    cam = np.stack([right, up, toward]) @ rotation("z", -azimuth)  # (3, 3) object -> camera
    v = mesh.vertices @ cam.T  # (N, 3) camera coordinates
    px_per_unit = scale * hi / 2
    screen = np.column_stack(
        [
            centre[1] * ss + px_per_unit * v[:, 0],  # x = column
            centre[0] * ss - px_per_unit * v[:, 1],  # y = row (image rows grow downwards)
            -v[:, 2],  # depth: smaller is nearer
        ]
    )
    face, _ = rasterize(screen, mesh.faces, hi, hi)  # (hi, hi)

    tri = v[mesh.faces]  # (M, 3, 3)
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # (M, 3)
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-12)
    normal *= np.where(normal[:, 2:] < 0, -1.0, 1.0)  # two-sided: face the camera
    la, le = np.deg2rad(light[0]), np.deg2rad(light[1])
    to_light = np.array([np.sin(la) * np.cos(le), np.sin(le), np.cos(la) * np.cos(le)])
    shade = ambient + (1.0 - ambient) * np.clip(normal @ to_light, 0.0, None)  # (M,)
    face_colour = np.asarray(colours)[mesh.slots] * shade[:, None]  # (M, 3)

    covered = face >= 0  # (hi, hi)
    premult = np.where(covered[..., None], face_colour[np.maximum(face, 0)], 0.0)  # (hi, hi, 3)
    # Average each ss x ss block: (hi, hi) -> (size, ss, size, ss) -> (size, size).
    alpha = covered.reshape(size, ss, size, ss).mean(axis=(1, 3))
    premult = premult.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    colour = premult / np.maximum(alpha, 1e-12)[..., None]
    return Layer(colour=colour, alpha=alpha)
