import numpy as np
import pytest

from pyro_backpass.data.raster import rasterize


def brute_force(vertices, faces, height, width):
    """Per pixel, per triangle: solve for barycentric weights with a 3x3 linear system."""
    face_index = np.full((height, width), -1)
    depth = np.full((height, width), np.inf)
    for r in range(height):
        for c in range(width):
            p = np.array([c + 0.5, r + 0.5, 1.0])
            for k, f in enumerate(faces):
                tri = vertices[f]  # (3, 3)
                a = np.vstack([tri[:, 0], tri[:, 1], np.ones(3)])
                if abs(np.linalg.det(a)) < 1e-12:
                    continue
                w = np.linalg.solve(a, p)
                if (w >= 0).all():
                    z = float(w @ tri[:, 2])
                    if z < depth[r, c]:
                        depth[r, c], face_index[r, c] = z, k
    return face_index, depth


def test_two_overlapping_triangles_nearer_wins():
    # A big far triangle and a small near one inside it; then swap their depths.
    v = np.array(
        [
            [0.2, 0.3, 5.0],
            [9.7, 0.4, 5.0],
            [0.1, 9.6, 5.0],
            [1.1, 1.2, 1.0],
            [5.3, 1.4, 1.0],
            [1.3, 5.2, 1.0],
        ]
    )
    f = np.array([[0, 1, 2], [3, 4, 5]])
    idx, depth = rasterize(v, f, 10, 10)
    assert idx[2, 2] == 1 and depth[2, 2] == pytest.approx(1.0)
    assert idx[7, 1] == 0 and depth[7, 1] == pytest.approx(5.0)
    assert idx[9, 9] == -1 and np.isinf(depth[9, 9])
    v[3:, 2] = 9.0  # the small triangle now lies behind: the big one shows everywhere it covers
    idx2, _ = rasterize(v, f, 10, 10)
    assert (idx2[idx2 >= 0] == 0).all()
    np.testing.assert_array_equal(idx2 >= 0, idx >= 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_interpenetrating_triangles(seed):
    rng = np.random.default_rng(seed)
    n, h, w = 12, 11, 13
    # Corners may lie outside the image (clipping), depths differ per corner (tilted planes
    # that cross each other), and windings are random.
    v = np.column_stack(
        [rng.uniform(-3, w + 3, 3 * n), rng.uniform(-3, h + 3, 3 * n), rng.uniform(0, 10, 3 * n)]
    )
    f = np.arange(3 * n).reshape(n, 3)
    idx, depth = rasterize(v, f, h, w)
    idx_bf, depth_bf = brute_force(v, f, h, w)
    np.testing.assert_array_equal(idx, idx_bf)
    np.testing.assert_allclose(depth, depth_bf, rtol=1e-9)


def test_degenerate_and_empty_inputs():
    v = np.array([[1.0, 1.0, 0.0], [5.0, 5.0, 0.0], [9.0, 9.0, 0.0]])  # collinear
    idx, _ = rasterize(v, np.array([[0, 1, 2]]), 10, 10)
    assert (idx == -1).all()
    idx, depth = rasterize(v, np.zeros((0, 3), dtype=int), 4, 5)
    assert idx.shape == (4, 5) and (idx == -1).all() and np.isinf(depth).all()


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="vertices"):
        rasterize(np.zeros((3, 2)), np.array([[0, 1, 2]]), 4, 4)
    with pytest.raises(ValueError, match="faces"):
        rasterize(np.zeros((3, 3)), np.array([0, 1, 2]), 4, 4)
