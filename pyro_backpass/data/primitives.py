"""Triangle meshes and the few primitives the object categories are built from.

Object frame: x points forward (the nose of an airplane, the front of a car), y to the object's
left, z up. Each face carries a colour *slot* (0 primary, 1 secondary, 2 dark accent) so that a
renderer can colour parts without knowing the category.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Mesh",
    "box",
    "concat",
    "ellipsoid",
    "loft",
    "prism",
    "rotation",
    "tube_between",
]

PRIMARY, SECONDARY, ACCENT = 0, 1, 2


@dataclass(frozen=True)
class Mesh:
    """A triangle mesh with a colour slot per face.

    :param vertices: ``(N, 3)`` float positions.
    :param faces: ``(M, 3)`` int vertex indices.
    :param slots: ``(M,)`` int colour slot per face.
    """

    vertices: np.ndarray
    faces: np.ndarray
    slots: np.ndarray

    def transformed(self, rot: np.ndarray | None = None, shift: Sequence[float] = (0, 0, 0)):
        """``rot @ v + shift`` for every vertex."""
        v = self.vertices if rot is None else self.vertices @ np.asarray(rot).T
        return Mesh(v + np.asarray(shift, dtype=np.float64), self.faces, self.slots)

    def mirrored_y(self) -> Mesh:
        """The mirror image across the xz plane (faces reversed to keep the winding)."""
        return Mesh(self.vertices * [1.0, -1.0, 1.0], self.faces[:, ::-1].copy(), self.slots)


def concat(meshes: Sequence[Mesh]) -> Mesh:
    """One mesh holding all faces of ``meshes``."""
    offsets = np.cumsum([0] + [len(m.vertices) for m in meshes[:-1]])
    return Mesh(
        np.concatenate([m.vertices for m in meshes]),
        np.concatenate([m.faces + o for m, o in zip(meshes, offsets, strict=True)]),
        np.concatenate([m.slots for m in meshes]),
    )


def rotation(axis: str, degrees: float) -> np.ndarray:
    """``(3, 3)`` right-handed rotation about ``"x"``, ``"y"`` or ``"z"``."""
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = {"x": (1, 2), "y": (2, 0), "z": (0, 1)}[axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _ellipse(n: int) -> np.ndarray:
    theta = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.cos(theta), np.sin(theta)], axis=1)  # (n, 2)


def loft(
    xs: Sequence[float],
    radii: Sequence[Sequence[float]],
    centres: Sequence[Sequence[float]] | None = None,
    *,
    profile: np.ndarray | int = 10,
    slot: int = PRIMARY,
) -> Mesh:
    """A surface swept along x through scaled copies of a closed 2-D ``profile``, capped at both
    ends (a fuselage, a hull, a bird's body).

    Station ``k`` sits at ``x = xs[k]`` and places profile point ``(u, v)`` at
    ``(y, z) = centres[k] + radii[k] * (u, v)``. ``profile`` is an ``(n, 2)`` star-shaped
    polygon around the origin, or an int ``n`` for an ellipse with ``n`` points.
    """
    prof = _ellipse(profile) if isinstance(profile, int) else np.asarray(profile, np.float64)
    xs = np.asarray(xs, np.float64)  # (K,)
    radii = np.asarray(radii, np.float64).reshape(len(xs), -1) * np.ones((1, 2))  # (K, 2)
    cen = np.zeros((len(xs), 2)) if centres is None else np.asarray(centres, np.float64)
    k, n = len(xs), len(prof)
    yz = cen[:, None, :] + radii[:, None, :] * prof[None, :, :]  # (K, n, 2)
    ring = np.concatenate([np.broadcast_to(xs[:, None, None], (k, n, 1)), yz], axis=2)
    verts = [ring.reshape(k * n, 3), np.column_stack([xs[[0, -1]], cen[[0, -1]]])]  # + 2 caps
    idx = np.arange(k * n).reshape(k, n)
    a, b = idx[:-1], np.roll(idx[:-1], -1, axis=1)  # (K-1, n) this ring, next point
    c, d = idx[1:], np.roll(idx[1:], -1, axis=1)
    quads = np.concatenate([np.stack([a, b, d], -1), np.stack([a, d, c], -1)]).reshape(-1, 3)
    cap0, cap1 = k * n, k * n + 1
    fan0 = np.stack([np.full(n, cap0), np.roll(idx[0], -1), idx[0]], -1)
    fan1 = np.stack([np.full(n, cap1), idx[-1], np.roll(idx[-1], -1)], -1)
    faces = np.concatenate([quads, fan0, fan1])
    return Mesh(np.concatenate(verts), faces, np.full(len(faces), slot))


def ellipsoid(
    centre: Sequence[float], radii: Sequence[float], *, n: int = 10, slot: int = PRIMARY
) -> Mesh:
    """An ellipsoid as a loft of ``n // 2 + 1`` rings along x."""
    phi = np.linspace(0.0, np.pi, n // 2 + 1)
    rx, ry, rz = radii
    xs = centre[0] + rx * np.cos(phi)
    r = np.stack([ry * np.sin(phi), rz * np.sin(phi)], 1)
    cen = np.broadcast_to(np.asarray(centre[1:], np.float64), (len(phi), 2))
    return loft(xs, r, cen, profile=n, slot=slot)


def _frame(direction: np.ndarray) -> np.ndarray:
    """A rotation whose first column is ``direction`` (normalised)."""
    a = direction / np.linalg.norm(direction)
    helper = np.array([0.0, 0.0, 1.0]) if abs(a[2]) < 0.9 else np.array([0.0, 1.0, 0.0])
    b = np.cross(helper, a)
    b /= np.linalg.norm(b)
    return np.stack([a, b, np.cross(a, b)], axis=1)


def tube_between(
    p0: Sequence[float],
    p1: Sequence[float],
    r0: float,
    r1: float | None = None,
    *,
    n: int = 8,
    slot: int = PRIMARY,
) -> Mesh:
    """A capped (truncated) cone from ``p0`` (radius ``r0``) to ``p1`` (radius ``r1``)."""
    p0, p1 = np.asarray(p0, np.float64), np.asarray(p1, np.float64)
    length = float(np.linalg.norm(p1 - p0))
    r1 = r0 if r1 is None else r1
    m = loft([0.0, length], [[r0, r0], [r1, r1]], profile=n, slot=slot)
    return m.transformed(_frame(p1 - p0), p0)


def prism(
    polygon: Sequence[Sequence[float]],
    thickness: float,
    *,
    plane: str = "xy",
    slot: int = PRIMARY,
) -> Mesh:
    """A convex polygon in a coordinate ``plane`` extruded symmetrically along the third axis
    (a wing in ``"xy"``, a fin or a car's side profile in ``"xz"``, a chair back in ``"yz"``)."""
    poly = np.asarray(polygon, np.float64)  # (K, 2)
    k = len(poly)
    axes = {"xy": (0, 1, 2), "xz": (0, 2, 1), "yz": (1, 2, 0)}[plane]
    verts = np.zeros((2 * k, 3))
    verts[:k, axes[0]], verts[:k, axes[1]], verts[:k, axes[2]] = poly[:, 0], poly[:, 1], -0.5
    verts[k:, axes[0]], verts[k:, axes[1]], verts[k:, axes[2]] = poly[:, 0], poly[:, 1], 0.5
    verts[:, axes[2]] *= thickness
    i = np.arange(1, k - 1)
    bottom = np.stack([np.zeros(k - 2, np.int64), i + 1, i], -1)
    top = np.stack([np.full(k - 2, k), k + i, k + i + 1], -1)
    j, jn = np.arange(k), (np.arange(k) + 1) % k
    sides = np.concatenate([np.stack([j, jn, k + jn], -1), np.stack([j, k + jn, k + j], -1)])
    faces = np.concatenate([bottom, top, sides])
    return Mesh(verts, faces, np.full(len(faces), slot))


def box(centre: Sequence[float], size: Sequence[float], *, slot: int = PRIMARY) -> Mesh:
    """An axis-aligned box."""
    sx, sy, sz = size
    rect = [[-sx / 2, -sy / 2], [sx / 2, -sy / 2], [sx / 2, sy / 2], [-sx / 2, sy / 2]]
    return prism(rect, sz, plane="xy", slot=slot).transformed(None, centre)
