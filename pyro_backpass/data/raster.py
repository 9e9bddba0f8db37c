"""A small vectorised z-buffer rasteriser (numpy, orthographic, flat-shaded).

No OpenGL is available in CI, and the images are small (64-128 px), so a rasteriser that tests
every pixel centre inside each triangle's bounding box, all triangles at once, is fast enough:
the candidate (triangle, pixel) pairs are generated with one ``np.repeat``, tested with edge
functions, and the nearest hit per pixel is kept by a stable sort on depth.

Conventions: pixel ``(row, col)`` has its centre at ``(x, y) = (col + 0.5, row + 0.5)``; a
pixel centre on a triangle's edge counts as inside; smaller depth is nearer the camera. With an
orthographic camera, depth is an affine function of ``(x, y)`` on each triangle, so linear
interpolation of vertex depths is exact.
"""

from __future__ import annotations

import numpy as np

__all__ = ["rasterize"]


def rasterize(
    vertices: np.ndarray, faces: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise triangles with a z-buffer.

    :param vertices: ``(N, 3)`` screen-space vertices ``(x, y, depth)``; x grows along columns,
        y along rows, in pixel units.
    :param faces: ``(M, 3)`` integer vertex indices.
    :returns: ``(face_index, depth)``, both ``(height, width)``: the index of the nearest face
        covering each pixel centre (``-1`` for none) and its depth (``+inf`` for none).
    """
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must have shape (N, 3), got {vertices.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape (M, 3), got {faces.shape}")
    face_index = np.full(height * width, -1, dtype=np.int64)
    zbuf = np.full(height * width, np.inf)
    if len(faces) == 0:
        return face_index.reshape(height, width), zbuf.reshape(height, width)

    tri = vertices[faces]  # (M, 3 corners, 3 coords)
    x, y, z = tri[..., 0], tri[..., 1], tri[..., 2]  # each (M, 3)
    # Twice the signed area; its sign flips the edge functions so both windings work.
    area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    # Pixel columns whose centre c + 0.5 lies in [min x, max x] (likewise rows).
    c0 = np.maximum(np.ceil(x.min(1) - 0.5), 0).astype(np.int64)
    c1 = np.minimum(np.floor(x.max(1) - 0.5), width - 1).astype(np.int64)
    r0 = np.maximum(np.ceil(y.min(1) - 0.5), 0).astype(np.int64)
    r1 = np.minimum(np.floor(y.max(1) - 0.5), height - 1).astype(np.int64)
    nw, nh = c1 - c0 + 1, r1 - r0 + 1
    keep = (nw > 0) & (nh > 0) & (np.abs(area) > 1e-12)
    counts = np.where(keep, nw * nh, 0)  # (M,)
    total = int(counts.sum())
    if total == 0:
        return face_index.reshape(height, width), zbuf.reshape(height, width)

    # One candidate per (triangle, pixel in its bounding box).
    t = np.repeat(np.arange(len(faces)), counts)  # (P,)
    local = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)  # (P,)
    col = c0[t] + local % nw[t]
    row = r0[t] + local // nw[t]
    px, py = col + 0.5, row + 0.5
    xt, yt, zt = x[t], y[t], z[t]  # (P, 3)
    inv = 1.0 / area[t]
    # Barycentric weight of corner k = edge function of the opposite edge / area.
    w0 = ((xt[:, 1] - px) * (yt[:, 2] - py) - (xt[:, 2] - px) * (yt[:, 1] - py)) * inv
    w1 = ((xt[:, 2] - px) * (yt[:, 0] - py) - (xt[:, 0] - px) * (yt[:, 2] - py)) * inv
    w2 = 1.0 - w0 - w1
    # A small tolerance so pixel centres exactly on a shared edge are not lost to rounding.
    eps = -1e-9
    inside = (w0 >= eps) & (w1 >= eps) & (w2 >= eps)
    t, pix = t[inside], (row * width + col)[inside]
    depth = (w0 * zt[:, 0] + w1 * zt[:, 1] + w2 * zt[:, 2])[inside]

    # Nearest hit per pixel: sort by depth, then the first occurrence of each pixel wins.
    order = np.argsort(depth, kind="stable")
    pix_sorted = pix[order]
    uniq, first = np.unique(pix_sorted, return_index=True)
    face_index[uniq] = t[order][first]
    zbuf[uniq] = depth[order][first]
    return face_index.reshape(height, width), zbuf.reshape(height, width)
