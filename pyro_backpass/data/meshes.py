"""Parametric meshes for each object category.

Each category has a sampler of shape parameters (a flat dict of numbers, so it can be stored
and shown) and a builder that turns those parameters into a :class:`Mesh`. The parameters
cover the within-category variation the generative model's mixture components should discover:
an airplane's wing span, sweep and dihedral, its tail and engines; a car's cabin and wheels; a
sail or motor boat; a chair's back, arms and legs; a flying or perched bird.

Every built mesh is centred on its bounding box and scaled to fit the unit sphere, so that the
renderer's scale distribution, which all categories share, sets the size in the image and the
category cannot be read off the size.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pyro_backpass.data.primitives import (
    ACCENT,
    SECONDARY,
    Mesh,
    box,
    concat,
    ellipsoid,
    loft,
    prism,
    rotation,
    tube_between,
)

__all__ = ["build_mesh", "normalise", "sample_shape"]

Shape = dict[str, float]


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _half_wing(x_le: float, root: float, tip: float, semispan: float, sweep: float) -> np.ndarray:
    """A trapezoidal half-wing planform in the xy plane, root on the x axis, tip at +y."""
    tip_le = x_le - semispan * np.tan(np.deg2rad(sweep))
    return np.array([[x_le, 0.0], [x_le - root, 0.0], [tip_le - tip, semispan], [tip_le, semispan]])


def _pair(half: Mesh) -> Mesh:
    return concat([half, half.mirrored_y()])


# --- airplane --------------------------------------------------------------------------------


def _sample_airplane(rng: np.random.Generator) -> Shape:
    return {
        "fuselage_radius": _u(rng, 0.04, 0.07),
        "nose_length": _u(rng, 0.08, 0.18),
        "tail_length": _u(rng, 0.2, 0.3),
        "tail_upsweep": _u(rng, 0.3, 0.9),
        "wing_span": _u(rng, 0.75, 1.15),
        "wing_root_chord": _u(rng, 0.14, 0.26),
        "wing_taper": _u(rng, 0.25, 0.7),
        "wing_sweep": _u(rng, 0.0, 40.0),
        "wing_dihedral": _u(rng, -4.0, 10.0),
        "wing_x": _u(rng, 0.0, 0.15),
        "wing_z": _u(rng, -0.7, 0.7),
        "htail_span": _u(rng, 0.25, 0.42),
        "htail_chord": _u(rng, 0.07, 0.12),
        "htail_sweep": _u(rng, 10.0, 40.0),
        "vfin_height": _u(rng, 0.12, 0.22),
        "vfin_chord": _u(rng, 0.12, 0.2),
        "vfin_sweep": _u(rng, 25.0, 55.0),
        "t_tail": float(rng.random() < 0.2),
        "engines": float(rng.choice([0, 2, 4], p=[0.3, 0.5, 0.2])),
        "engine_radius": _u(rng, 0.025, 0.04),
    }


def _airplane(s: Shape) -> Mesh:
    r, nose, tail = s["fuselage_radius"], s["nose_length"], s["tail_length"]
    up = s["tail_upsweep"] * r
    xs = [0.5, 0.5 - 0.3 * nose, 0.5 - nose, -0.5 + tail, -0.5 + 0.4 * tail, -0.5]
    radii = np.array([0.15, 0.7, 1.0, 1.0, 0.6, 0.25]) * r
    cz = [0.0, -0.1 * r, 0.0, 0.0, 0.6 * up, up]
    parts = [loft(xs, radii, np.column_stack([np.zeros(6), cz]), profile=12)]

    semi, sweep, dihedral = s["wing_span"] / 2, s["wing_sweep"], s["wing_dihedral"]
    root = s["wing_root_chord"]
    wz = s["wing_z"] * r
    planform = _half_wing(s["wing_x"], root, root * s["wing_taper"], semi, sweep)
    rot = rotation("x", dihedral)
    parts.append(_pair(prism(planform, 0.022).transformed(rot, (0, 0, wz))))

    fin_h, fin_c = s["vfin_height"], s["vfin_chord"]
    x_fin = -0.5 + fin_c + 0.01
    fin = _half_wing(x_fin, fin_c, 0.55 * fin_c, fin_h, s["vfin_sweep"])
    parts.append(prism(fin, 0.018, plane="xz", slot=SECONDARY).transformed(None, (0, 0, up)))

    hc = s["htail_chord"]
    if s["t_tail"]:
        x_h = x_fin - fin_h * np.tan(np.deg2rad(s["vfin_sweep"]))
        z_h = up + fin_h
    else:
        x_h, z_h = -0.5 + hc + 0.02, up
    htail = _half_wing(x_h, hc, 0.6 * hc, s["htail_span"] / 2, s["htail_sweep"])
    parts.append(_pair(prism(htail, 0.016).transformed(rotation("x", 4.0), (0, 0, z_h))))

    n_eng = int(s["engines"])
    re = s["engine_radius"]
    for frac in {0: [], 2: [0.35], 4: [0.3, 0.6]}[n_eng]:
        y = frac * semi
        x_le = s["wing_x"] - y * np.tan(np.deg2rad(sweep))
        z = wz + y * np.tan(np.deg2rad(dihedral)) - 1.4 * re
        length = 4.5 * re
        eng = tube_between(
            (x_le + 0.6 * length, y, z), (x_le - 0.4 * length, y, z), re, 0.8 * re, n=8, slot=ACCENT
        )
        parts.append(_pair(eng))
    return concat(parts)


# --- car -------------------------------------------------------------------------------------


def _sample_car(rng: np.random.Generator) -> Shape:
    return {
        "width": _u(rng, 0.38, 0.5),
        "body_height": _u(rng, 0.13, 0.22),
        "wheel_radius": _u(rng, 0.08, 0.12),
        "clearance": _u(rng, 0.5, 0.9),  # body floor height, in wheel radii
        "wheelbase": _u(rng, 0.55, 0.7),
        "nose_bevel": _u(rng, 0.04, 0.16),
        "rear_bevel": _u(rng, 0.02, 0.12),
        "cabin_length": _u(rng, 0.3, 0.62),
        "cabin_offset": _u(rng, -0.15, 0.1),
        "cabin_height": _u(rng, 0.11, 0.2),
        "windscreen_slope": _u(rng, 0.04, 0.18),
        "rear_slope": _u(rng, 0.0, 0.22),
        "cabin_width": _u(rng, 0.8, 0.93),
    }


def _car(s: Shape) -> Mesh:
    w, h, rw = s["width"], s["body_height"], s["wheel_radius"]
    zc = s["clearance"] * rw
    nb, rb = s["nose_bevel"], s["rear_bevel"]
    body = [
        (-0.5, zc),
        (0.5, zc),
        (0.5, zc + 0.55 * h),
        (0.5 - nb, zc + h),
        (-0.5 + rb, zc + h),
        (-0.5, zc + 0.75 * h),
    ]
    parts = [prism(body, w, plane="xz")]
    cl, cx, ch, zt = s["cabin_length"], s["cabin_offset"], s["cabin_height"], zc + h
    ws, rs = min(s["windscreen_slope"], 0.4 * cl), min(s["rear_slope"], 0.4 * cl)
    cabin = [
        (cx - cl / 2, zt),
        (cx + cl / 2, zt),
        (cx + cl / 2 - ws, zt + ch),
        (cx - cl / 2 + rs, zt + ch),
    ]
    parts.append(prism(cabin, w * s["cabin_width"], plane="xz", slot=SECONDARY))
    ww = 0.07
    for x in (-s["wheelbase"] / 2, s["wheelbase"] / 2):
        y = w / 2 - ww / 2 + 0.012
        parts.append(
            _pair(tube_between((x, y - ww / 2, rw), (x, y + ww / 2, rw), rw, n=12, slot=ACCENT))
        )
    return concat(parts)


# --- boat ------------------------------------------------------------------------------------

# Half-ellipse hull section; the deck is the closing edge from (1, 0) back to (-1, 0).
_HULL = np.array(
    [
        [-1, 0],
        [-0.97, -0.45],
        [-0.75, -0.8],
        [-0.35, -0.97],
        [0, -1],
        [0.35, -0.97],
        [0.75, -0.8],
        [0.97, -0.45],
        [1, 0],
    ],
    dtype=np.float64,
)


def _sample_boat(rng: np.random.Generator) -> Shape:
    return {
        "beam": _u(rng, 0.22, 0.34),
        "hull_depth": _u(rng, 0.09, 0.16),
        "bow_fraction": _u(rng, 0.25, 0.45),
        "stern_width": _u(rng, 0.6, 0.9),
        "sheer": _u(rng, 0.0, 0.07),
        "sail": float(rng.random() < 0.5),
        "mast_height": _u(rng, 0.55, 0.95),
        "mast_x": _u(rng, 0.0, 0.18),
        "boom_length": _u(rng, 0.3, 0.45),
        "jib": float(rng.random() < 0.7),
        "cabin_length": _u(rng, 0.22, 0.45),
        "cabin_height": _u(rng, 0.07, 0.13),
        "cabin_x": _u(rng, -0.15, 0.08),
        "upper_deck": float(rng.random() < 0.5),
    }


def _boat(s: Shape) -> Mesh:
    b, d, bow, stern = s["beam"], s["hull_depth"], s["bow_fraction"], s["stern_width"]
    xs = np.linspace(-0.5, 0.5, 11)
    t = xs + 0.5  # 0 at the stern, 1 at the bow
    half = np.where(t > 1 - bow, np.sqrt(np.clip((1 - t) / bow, 0, 1)), 1.0) * (b / 2)
    half *= stern + (1 - stern) * np.minimum(1.0, t / 0.3)
    deck_z = s["sheer"] * t**2
    radii = np.column_stack([half, d * (1 - 0.3 * np.clip(t - (1 - bow), 0, 1) / bow)])
    parts = [loft(xs, radii, np.column_stack([np.zeros_like(xs), deck_z]), profile=_HULL)]

    def deck(x: float) -> float:
        return float(np.interp(x, xs, deck_z))

    if s["sail"]:
        mx, mh = s["mast_x"], s["mast_height"]
        z0 = deck(mx)
        parts.append(tube_between((mx, 0, z0), (mx, 0, z0 + mh), 0.012, n=6, slot=ACCENT))
        main = [
            (mx - 0.02, z0 + 0.08),
            (mx - s["boom_length"], z0 + 0.08),
            (mx - 0.02, z0 + 0.95 * mh),
        ]
        parts.append(prism(main, 0.008, plane="xz", slot=SECONDARY))
        if s["jib"]:
            jib = [(mx + 0.02, z0 + 0.05), (0.43, deck(0.43) + 0.04), (mx + 0.02, z0 + 0.8 * mh)]
            parts.append(prism(jib, 0.008, plane="xz", slot=SECONDARY))
    else:
        cl, ch, cx = s["cabin_length"], s["cabin_height"], s["cabin_x"]
        z0 = deck(cx)
        cabin = [
            (cx - cl / 2, z0),
            (cx + cl / 2, z0),
            (cx + cl / 2 - 0.06, z0 + ch),
            (cx - cl / 2, z0 + ch),
        ]
        parts.append(prism(cabin, 0.7 * b, plane="xz", slot=SECONDARY))
        if s["upper_deck"]:
            parts.append(
                box(
                    (cx - 0.1 * cl, 0, z0 + 1.4 * ch), (0.5 * cl, 0.5 * b, 0.8 * ch), slot=SECONDARY
                )
            )
    return concat(parts)


# --- chair -----------------------------------------------------------------------------------


def _sample_chair(rng: np.random.Generator) -> Shape:
    return {
        "seat_width": _u(rng, 0.4, 0.55),
        "seat_depth": _u(rng, 0.38, 0.52),
        "seat_height": _u(rng, 0.38, 0.5),
        "seat_thickness": _u(rng, 0.03, 0.07),
        "leg_radius": _u(rng, 0.015, 0.03),
        "leg_splay": _u(rng, 0.0, 0.05),
        "back_height": _u(rng, 0.35, 0.6),
        "back_tilt": _u(rng, 0.0, 20.0),
        "back_panel": _u(rng, 0.25, 1.0),  # fraction of the back filled by the panel
        "slats": float(rng.choice([0, 2, 3, 4])),
        "arms": float(rng.random() < 0.35),
        "stretchers": float(rng.random() < 0.4),
    }


def _chair(s: Shape) -> Mesh:
    w, dp, h, th = s["seat_width"], s["seat_depth"], s["seat_height"], s["seat_thickness"]
    lr, splay = s["leg_radius"], s["leg_splay"]
    parts = [box((0, 0, h - th / 2), (dp, w, th))]
    feet = {}
    for sx in (-1, 1):
        for sy in (-1, 1):
            top = (sx * (dp / 2 - lr), sy * (w / 2 - lr), h - th)
            foot = (top[0] + sx * splay, top[1] + sy * splay, 0.0)
            feet[sx, sy] = (top, foot)
            parts.append(tube_between(foot, top, lr, n=6, slot=SECONDARY))
    bh, tilt = s["back_height"], np.deg2rad(s["back_tilt"])
    xb = -dp / 2 + lr
    post_tops = []
    for sy in (-1, 1):
        top = (xb - bh * np.tan(tilt), sy * (w / 2 - lr), h + bh)
        post_tops.append(top)
        parts.append(tube_between((xb, sy * (w / 2 - lr), h), top, lr, n=6, slot=SECONDARY))
    # Back: a panel over the top part of the posts, or horizontal slats below it.
    lean = rotation("y", -s["back_tilt"])
    panel_h = s["back_panel"] * bh
    panel = box((0, 0, bh - panel_h / 2), (0.025, w - 2 * lr, panel_h))
    parts.append(panel.transformed(lean, (xb, 0, h)))
    for k in range(int(s["slats"])):
        zk = (bh - panel_h) * (k + 1) / (s["slats"] + 1)
        if zk > 0.04:
            slat = box((0, 0, zk), (0.02, w - 2 * lr, 0.03))
            parts.append(slat.transformed(lean, (xb, 0, h)))
    if s["arms"]:
        for sy in (-1, 1):
            y = sy * (w / 2 - lr)
            parts.append(box((0, y, h + 0.2), (dp, 0.04, 0.025), slot=SECONDARY))
            parts.append(
                tube_between(
                    (dp / 2 - lr, y, h), (dp / 2 - lr, y, h + 0.2), lr, n=6, slot=SECONDARY
                )
            )
    if s["stretchers"]:
        for a, b in [((-1, -1), (1, -1)), ((-1, 1), (1, 1)), ((1, -1), (1, 1))]:
            pa = np.add(feet[a][1], 0.3 * np.subtract(feet[a][0], feet[a][1]))
            pb = np.add(feet[b][1], 0.3 * np.subtract(feet[b][0], feet[b][1]))
            parts.append(tube_between(pa, pb, 0.7 * lr, n=6, slot=SECONDARY))
    return concat(parts)


# --- bird ------------------------------------------------------------------------------------


def _sample_bird(rng: np.random.Generator) -> Shape:
    return {
        "body_length": _u(rng, 0.45, 0.6),
        "body_radius": _u(rng, 0.09, 0.13),
        "head_radius": _u(rng, 0.06, 0.09),
        "neck": _u(rng, 0.5, 1.1),  # head height above the body axis, in body radii
        "beak_length": _u(rng, 0.05, 0.14),
        "tail_length": _u(rng, 0.12, 0.22),
        "tail_spread": _u(rng, 0.05, 0.14),
        "tail_tilt": _u(rng, -15.0, 20.0),
        "flying": float(rng.random() < 0.6),
        "wing_span": _u(rng, 0.9, 1.4),
        "wing_chord": _u(rng, 0.13, 0.22),
        "wing_flap": _u(rng, -20.0, 35.0),
        "wing_elbow": _u(rng, -30.0, 10.0),
        "wing_sweep": _u(rng, -5.0, 25.0),
        "leg_length": _u(rng, 0.08, 0.18),
    }


def _bird(s: Shape) -> Mesh:
    bl, br, hr = s["body_length"], s["body_radius"], s["head_radius"]
    parts = [ellipsoid((0, 0, 0), (bl / 2, br, 0.95 * br), n=12)]
    head = np.array([0.42 * bl, 0.0, s["neck"] * br])
    parts.append(ellipsoid(head, (hr * 1.1, hr, hr), n=10))
    parts.append(
        tube_between(
            head + [0.8 * hr, 0, 0],
            head + [hr + s["beak_length"], 0, -0.25 * s["beak_length"]],
            0.35 * hr,
            0.002,
            n=6,
            slot=ACCENT,
        )
    )
    tl, spread = s["tail_length"], s["tail_spread"]
    x_t = -0.35 * bl
    tail = [(x_t, -0.4 * br), (x_t, 0.4 * br), (x_t - tl, spread), (x_t - tl, -spread)]
    parts.append(prism(tail, 0.015, slot=SECONDARY).transformed(rotation("y", s["tail_tilt"])))
    if s["flying"]:
        semi, chord = s["wing_span"] / 2, s["wing_chord"]
        inner_b = 0.45 * semi
        inner = prism(
            _half_wing(0.5 * chord, chord, 0.9 * chord, inner_b, s["wing_sweep"]),
            0.02,
            slot=SECONDARY,
        )
        tip_le = 0.5 * chord - inner_b * np.tan(np.deg2rad(s["wing_sweep"]))
        outer_poly = [
            (tip_le, 0.0),
            (tip_le - 0.9 * chord, 0.0),
            (tip_le - 0.75 * chord - 0.3 * semi, semi - inner_b),
        ]
        outer = prism(outer_poly, 0.015, slot=SECONDARY)
        flap = rotation("x", s["wing_flap"])
        elbow = flap @ rotation("x", s["wing_elbow"])
        hinge = flap @ np.array([0.0, inner_b, 0.0])
        half = concat([inner.transformed(flap), outer.transformed(elbow, hinge)])
        parts.append(_pair(half.transformed(None, (0, 0.6 * br, 0.3 * br))))
    else:
        wing = ellipsoid((-0.05 * bl, 0.0, 0.0), (0.42 * bl, 0.03, 0.6 * br), n=10, slot=SECONDARY)
        parts.append(_pair(wing.transformed(rotation("y", 12.0), (0, 0.85 * br, 0.15 * br))))
        ll = s["leg_length"]
        leg = concat(
            [
                tube_between(
                    (0.02, 0.4 * br, -0.8 * br),
                    (0.03, 0.4 * br, -0.8 * br - ll),
                    0.012,
                    n=5,
                    slot=ACCENT,
                ),
                tube_between(
                    (-0.02, 0.4 * br, -0.8 * br - ll),
                    (0.08, 0.4 * br, -0.8 * br - ll),
                    0.01,
                    n=5,
                    slot=ACCENT,
                ),
            ]
        )
        parts.append(_pair(leg))
    return concat(parts)


_SAMPLERS: dict[str, Callable[[np.random.Generator], Shape]] = {
    "airplane": _sample_airplane,
    "bird": _sample_bird,
    "boat": _sample_boat,
    "car": _sample_car,
    "chair": _sample_chair,
}
_BUILDERS: dict[str, Callable[[Shape], Mesh]] = {
    "airplane": _airplane,
    "bird": _bird,
    "boat": _boat,
    "car": _car,
    "chair": _chair,
}


def normalise(mesh: Mesh) -> Mesh:
    """Centre ``mesh`` on its bounding box and scale it into the unit sphere."""
    v = mesh.vertices
    centre = (v.min(0) + v.max(0)) / 2
    radius = float(np.linalg.norm(v - centre, axis=1).max())
    return Mesh((v - centre) / radius, mesh.faces, mesh.slots)


def sample_shape(category: str, rng: np.random.Generator) -> Shape:
    """Draw the shape parameters of one object of ``category`` (a known category)."""
    return _SAMPLERS[category](rng)


def build_mesh(category: str, shape: Shape) -> Mesh:
    """The normalised mesh of ``category`` with shape parameters ``shape``."""
    return normalise(_BUILDERS[category](shape))
