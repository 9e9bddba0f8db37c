"""Σ_i log_score_i of every (φ, δ) hypothesis of a level at once: greedy MAP's hot path.

For one level, greedy MAP needs, for each image b, each unshifted top-down prediction φ_t (a
mixture component, or a (category, γ) template) and each offset δ::

    S[b, t, δ] = Σ_i s(f_bu[b, i], shift(φ_t, δ)[i])

with ``s`` the closed-form per-element maximum of eq. (13) (:func:`~pyro_backpass.closed_form_td`).
Evaluating ``s`` on every shifted copy of every φ is what the plain formula does. Two identities
make the same sum much cheaper, without changing its value (up to float rounding):

**Shift the image, not the hypotheses.** A shift with zero fill moves φ_t's element j to
i = j + δ; image elements with no φ behind them see φ = 0. So, with s0_i = s(f_bu,i, 0)::

    S[b, t, δ] = Σ_i s0_i + Σ_j w[b, δ, j] (s(f_bu[b, j + δ], φ_t[j]) − s0_{j + δ})

where ``w`` is 1 where j + δ is inside the map (and observed) and 0 elsewhere — the image and
``w`` are shifted once per offset, and each φ_t is used unshifted. The difference is formed per
element by the same kernels for both terms, so it is exactly 0 wherever φ_t is 0 (a dead
component ties at every offset, and ties go to the lowest index as in the plain formula).

When the hypotheses are shared by all images (the top level's templates), the other way round
is cheaper still: the template side of the per-element terms below does not depend on the
image, so it is shifted once (:func:`template_planes`, which callers may keep between calls)
and compared with the unshifted image directly; zero-filled elements then *are* φ = 0, and no
correction is needed.

**The per-element maximum in few operations.** With precisions p0 = σ0⁻², p1 = σ1⁻², p2 = σ2⁻²
and the on-branch constant K_on = log N(0; 0, σ0) + log N(0; 0, σ1), write s = K_on − n with::

    n_on  = ½ p_c (f_bu − φ)² + ½ (p0 + p1) · relu(λ − η)²        p_c = p0 p1 / (p0 + p1)
    n_off = ½ p2 (f_bu − β)² + log σ2 − log σ1 + ½ p0 · relu(φ − λ⁻)²
    n     = min(n_on, n_off)

(η the precision-weighted mid-point of eq. 13: the constrained minimum over f_td ≥ λ of a
quadratic with vertex η is its vertex value plus the curvature term; λ⁻ the float below λ, as
in the closed form). Every factor splits into an image part and a φ part, so each element of
each hypothesis costs about eight vectorised operations instead of thirty.

The oracle in the tests is the plain formula: :func:`~pyro_backpass.closed_form_td` summed over
:func:`~pyro_backpass.model.top_down.shift_all` copies.
"""

from __future__ import annotations

import math

import torch

from pyro_backpass.inference.cache_blocks import block_elements
from pyro_backpass.inference.closed_form import as_mask, select
from pyro_backpass.inference.fused_scores import (
    compile_enabled,
    compiled_scores,
    compiled_shared_scores,
)
from pyro_backpass.model.observation import ClosedFormConstants
from pyro_backpass.model.top_down import shift_all

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "hypothesis_scores", "template_planes"]

# Elements of φ per chunk of (images × hypotheses × level). The scoring itself runs in
# cache-sized blocks (cache_blocks.py) and keeps no temporaries of this size, so the bound is
# on φ (and the top level's template planes) alone: 2**25 (128 MB of float32) keeps φ of every
# component in one piece at the default model's size, batch 32, so it is convolved once.
DEFAULT_CHUNK_ELEMENTS = 2**25


def hypothesis_scores(
    c: ClosedFormConstants,
    bu: torch.Tensor | None,
    phi: torch.Tensor,
    offsets: torch.Tensor,
    *,
    observed: torch.Tensor | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    planes: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σ_i log_score_i`` of every hypothesis ``(t, δ)``: ``(B, T, D)``.

    Equal, up to float rounding, to::

        closed_form_with(c, bu[:, None, None], shift_all(phi, offsets), ...)[1].sum((-3, -2, -1))

    :param c: the level's closed-form constants (``Observation.constants``).
    :param bu: ``(B, C, H, W)`` bottom-up activations, or None (level unobserved).
    :param phi: ``(B or 1, T, C, H, W)`` unshifted top-down predictions (1: shared by images).
    :param offsets: ``(D, 2)`` long (dy, dx) of the shifts (zero fill).
    :param observed: None or a bool mask broadcastable to ``(B, C, H, W)``.
    :param chunk_elements: bound on ``B·D·T'·C·H·W`` per chunk of hypotheses ``T'``.
    :param planes: ``template_planes(c, phi[0], offsets)`` kept from an earlier call, for
        hypotheses shared by all images (``phi`` of batch size 1).
    """
    t, (ch, h, w) = phi.shape[1], phi.shape[-3:]
    d, j = offsets.shape[0], ch * h * w
    if bu is None:
        return phi.new_zeros(()).add(j * c.log_norm_td).expand(phi.shape[0], t, d)
    b = bu.shape[0]
    grad = torch.is_grad_enabled() and any(
        isinstance(v, torch.Tensor) and v.requires_grad for v in (bu, phi, planes, *c)
    )
    weight = None
    if observed is not None:
        weight = as_mask(torch.broadcast_to(observed, bu.shape), like=bu)  # (B, C, H, W) 0/1
        bu = select(weight, bu, c.background)  # harmless values where nothing is observed
    k_on = c.const_on.expand(ch, h, w)
    if not grad and planes is None and phi.shape[0] > 1 and compile_enabled():
        # Opt-in fused kernel (fused_scores.py): every hypothesis in one compiled loop.
        fused = compiled_scores(c, phi, offsets, bu, weight)
        if fused is not None:
            return fused
    shared_planes = planes is not None or (phi.shape[0] == 1 and 3 * t * d * j <= chunk_elements)
    if not grad and not shared_planes and phi.shape[0] == 1 and d > 1:
        # Shared templates too many to keep all planes: planes of one chunk of templates at a
        # time (contiguous rows of J; windows of small maps would be short strided rows).
        per = max(1, chunk_elements // (3 * d * j))
        parts = [
            hypothesis_scores(c, bu, phi[:, t0 : t0 + per], offsets, observed=observed,
                              chunk_elements=chunk_elements,
                              planes=template_planes(c, phi[0, t0 : t0 + per], offsets))
            for t0 in range(0, t, per)
        ]  # fmt: skip
        return torch.cat(parts, dim=1)  # (B, T, D)
    if not grad and not shared_planes:
        block = min(chunk_elements, block_elements(bu.element_size()))
        return _blocked_per_image_scores(c, phi, offsets, bu, weight, k_on, block)
    # From here on gradients flow (the blocked kernels above write in place): plain operations.
    # Image side, unshifted: (B, C, H, W) each.
    x_quad = c.root_half_prec_c * bu  # a f_bu
    x_clip = c.clip_on * (c.threshold - bu)
    x_off = c.half_prec_off * (bu - c.background).square() + (c.const_on - c.const_off)
    # Σ_i s_i = Σ_i [K_on − n_i] over observed elements, log N(φ; φ, σ0) over the others.
    if shared_planes:
        if planes is None:
            planes = template_planes(c, phi[0], offsets)
        if not grad:
            if compile_enabled():  # opt-in (fused_scores.py): one compiled loop
                fused = compiled_shared_scores(
                    planes, (x_quad, x_clip, x_off), weight, _shared_const(c, weight, k_on)
                )
                if fused is not None:
                    return fused
            block = min(chunk_elements, block_elements(bu.element_size()))
            return _blocked_shared_scores(c, planes, x_quad, x_clip, x_off, weight, k_on, block)
        const = (
            k_on.sum()
            if weight is None
            else (weight * k_on + (1 - weight) * c.log_norm_td).sum(dim=(-3, -2, -1))[:, None, None]
        )
        x = [v.reshape(b, 1, 1, j) for v in (x_quad, x_clip, x_off)]
        wt = None if weight is None else weight.reshape(b, 1, 1, j)
        per = max(1, chunk_elements // max(1, b * d * j))
        parts = []
        for start in range(0, t, per):
            sides = planes[:, start : start + per].unsqueeze(1)  # 3 × (1, T', D, J)
            n = _n(*x, *sides, scratch=None)  # (B, T', D, J)
            parts.append((n if wt is None else n * wt).sum(dim=-1))  # (B, T', D)
        return const - (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])  # (B, T, D)
    return _per_image_scores(c, phi, offsets, x_quad, x_clip, x_off, weight, k_on, chunk_elements)


def _shared_const(c: ClosedFormConstants, weight, k_on) -> torch.Tensor:
    """Σ_i of the scores at n = 0: K_on where observed, log N(φ; φ, σ0) elsewhere; ``()`` or
    ``(B, 1)``."""
    if weight is None:
        return k_on.sum()
    return (weight * k_on + (1 - weight) * c.log_norm_td).sum(dim=(-3, -2, -1))[:, None]


def _blocked_shared_scores(c, planes, x_quad, x_clip, x_off, weight, k_on, block):
    """Scores ``(B, T, D)`` against template planes ``(3, T, D, J)`` shared by all images,
    one cache-sized block of (images × template rows × J) at a time."""
    b, (_, t, d, j) = x_quad.shape[0], planes.shape
    const = _shared_const(c, weight, k_on)
    x = [v.reshape(b, 1, j) for v in (x_quad, x_clip, x_off)]  # (B, 1, J) each
    wt = None if weight is None else weight.reshape(b, 1, j)
    sides = planes.reshape(3, 1, t * d, j)  # (3, 1, R, J), R = T*D rows
    rows = max(1, min(t * d, block // j))
    per = max(1, min(b, block // (rows * j)))
    scratch = x_quad.new_empty(2 * per * rows * j)
    out = x_quad.new_empty(b, t * d)
    # Rows outside, images inside: a block of template planes stays in cache for every image.
    for r0 in range(0, t * d, rows):
        q, k, o = sides[:, :, r0 : r0 + rows]  # (1, R', J) each
        for b0 in range(0, b, per):
            xs = [v[b0 : b0 + per] for v in x]
            n = _n(*xs, q, k, o, scratch=scratch)  # (B', R', J)
            if wt is not None:
                n.mul_(wt[b0 : b0 + per])
            out[b0 : b0 + per, r0 : r0 + rows] = n.sum(dim=-1)
    return (const - out).reshape(b, t, d)


def _blocked_per_image_scores(c, phi, offsets, bu, weight, k_on, block):
    """Scores ``(B, T, D)`` of per-image (or shared) φ ``(B|1, T, C, H, W)``, by offset.

    For offset δ, φ's element j meets image element j + δ; the pairs that stay inside the map
    form one rectangle, so each offset compares a window of φ with a window of the image (views,
    no shifted copies, no zero-fill weights). Everything, the image side included, is made per
    cache-sized block of (images × hypotheses), so no pass runs over a full-size temporary.
    """
    b, t, (ch, h, w) = bu.shape[0], phi.shape[1], phi.shape[-3:]
    j = ch * h * w
    windows = [_windows(dy, dx, h, w) for dy, dx in offsets.tolist()]
    # One offset at (0, 0): every pair is inside, no tie across offsets to keep exact, so
    # Σ_i s_i = Σ_i K_on − n_i directly (no n0).
    plain = windows == [((slice(0, h), slice(0, w)),) * 2]
    per_t = max(1, min(t, block // j))
    per_b = max(1, min(b, block // (per_t * j)))
    shared = phi.shape[0] == 1
    scratch = bu.new_empty(2 * per_b * per_t * j)
    image_buf = bu.new_empty((3 if plain else 4) * per_b * j)
    side_buf = bu.new_empty(3 * (1 if shared else per_b) * per_t * j)
    zero = phi.new_zeros(1, ch, h, w)
    zero_side = _phi_side_into(c, zero, zero.new_empty(3 * j))  # φ = 0: (1, C, H, W) each
    out = bu.new_empty(b, t, len(windows))
    for b0 in range(0, b, per_b):
        b1 = min(b, b0 + per_b)
        x = _image_side_into(c, bu[b0:b1], image_buf)  # 3 × (B', C, H, W)
        wb = None if weight is None else weight[b0:b1]
        if plain:
            base = k_on if wb is None else wb * k_on + (1 - wb) * c.log_norm_td
            base = base.sum(dim=(-3, -2, -1)).reshape(-1, 1, 1)  # () or (B', 1, 1)
        else:
            # n at φ = 0 by the very kernels used for every hypothesis below, so an element
            # whose φ is 0 contributes exactly 0 to (n − n0): a dead component ties at every δ.
            n0 = image_buf[3 * (b1 - b0) * j : 4 * (b1 - b0) * j].view(b1 - b0, ch, h, w)
            n0 = _n_into(x, zero_side, n0, scratch)
            # Σ_i s0_i: observed elements score K_on − n0, the others log N(φ; φ, σ0).
            s0 = k_on - n0 if wb is None else wb * (k_on - n0) + (1 - wb) * c.log_norm_td
            base = s0.sum(dim=(-3, -2, -1)).reshape(-1, 1, 1)  # (B', 1, 1)
            x = (*x, n0)
        xs = [v[:, None] for v in x]  # (B', 1, C, H, W) each
        wb = None if wb is None else wb[:, None]
        for t0 in range(0, t, per_t):
            t1 = min(t, t0 + per_t)
            if not shared or b0 == 0 or per_t < t:  # shared φ fitting one block: made once
                ph = phi[:, t0:t1] if shared else phi[b0:b1, t0:t1]  # (B'|1, T', C, H, W)
                sides = _phi_side_into(c, ph, side_buf)
            for di, win in enumerate(windows):
                if win is None:  # shifted off the map: every pair is outside, Σ = 0
                    out[b0:b1, t0:t1, di] = base.reshape(-1, 1)
                    continue
                (py, px), (iy, ix) = win
                xw = [v[..., iy, ix] for v in xs]  # (B', 1, C, h', w')
                n = _n(*xw[:3], *(v[..., py, px] for v in sides), scratch=scratch)
                if not plain:
                    n.sub_(xw[3])  # (B', T', C, h', w'): n − n0, 0 wherever φ = 0
                if wb is not None:
                    n.mul_(wb[..., iy, ix])
                out[b0:b1, t0:t1, di] = (base - n.sum(dim=(-3, -2, -1))[..., None])[..., 0]
    return out


def _image_side_into(c: ClosedFormConstants, bu: torch.Tensor, buf: torch.Tensor):
    """The image side of n for ``bu`` ``(B', C, H, W)``, written into ``buf``: a f_bu,
    κ p1 (λ − f_bu), ½ p2 (f_bu − β)² + K_on − K_off; the kernels of the unblocked path."""
    size = bu.numel()
    q, k, o = (buf[i * size : (i + 1) * size].view(bu.shape) for i in range(3))
    torch.mul(c.root_half_prec_c, bu, out=q)
    torch.mul(c.clip_on, torch.sub(bu, c.threshold, out=k).neg_(), out=k)
    torch.sub(bu, c.background, out=o).square_().mul_(c.half_prec_off)
    o.add_(c.const_on - c.const_off)
    return q, k, o


def _n_into(x, sides, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """:func:`_n` of image side ``x`` and φ side ``sides``, copied into ``out``."""
    return out.copy_(_n(*x[:3], *sides, scratch=scratch))


def _windows(dy: int, dx: int, h: int, w: int):
    """φ's window and the image's window that meet at offset (dy, dx), or None if empty."""
    y0, y1, x0, x1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
    if y0 >= y1 or x0 >= x1:
        return None
    phi_win = (slice(y0, y1), slice(x0, x1))
    return phi_win, (slice(y0 + dy, y1 + dy), slice(x0 + dx, x1 + dx))


def _phi_side_into(c: ClosedFormConstants, ph: torch.Tensor, buf: torch.Tensor):
    """:func:`_phi_side` of ``ph`` ``(…, C, H, W)``, written into ``buf``: the same kernels in
    the same order, so the values are the same to the bit."""
    size = ph.numel()
    q, k, o = (buf[i * size : (i + 1) * size].view(ph.shape) for i in range(3))
    torch.mul(c.root_half_prec_c, ph, out=q)
    # λ − φ as −(φ − λ): IEEE subtraction is antisymmetric, so the same value to the bit.
    torch.mul(c.clip_td, torch.sub(ph, c.threshold, out=k).neg_(), out=k)
    torch.sub(ph, c.below, out=o).clamp_min_(0).square_().mul_(c.half_prec_td)
    return q, k, o


def _per_image_scores(c, phi, offsets, x_quad, x_clip, x_off, weight, k_on, chunk_elements):
    """Scores ``(B, T, D)`` of φ ``(B|1, T, C, H, W)``: the image shifted by −δ (the
    differentiable path; :func:`_blocked_per_image_scores` is the fast one)."""
    b, t, (ch, h, w) = x_quad.shape[0], phi.shape[1], phi.shape[-3:]
    d, j = offsets.shape[0], ch * h * w
    ones = torch.ones_like(x_quad) if weight is None else weight
    # n at φ = 0 by the very kernels used for every hypothesis below, so an element whose φ is
    # 0 contributes exactly 0 to (n − n0), and a dead component ties at every offset.
    n0 = _n(*(v.reshape(b, 1, 1, j) for v in (x_quad, x_clip, x_off)),
            *_phi_side(c, phi.new_zeros(1, 1, 1, j), ch, h, w), scratch=None)  # fmt: skip
    n0 = n0.reshape(b, ch, h, w)
    # Σ_i s0_i: observed elements score K_on − n0, the others log N(φ; φ, σ0).
    base = (ones * (k_on - n0) + (1 - ones) * c.log_norm_td).sum(dim=(-3, -2, -1))  # (B,)
    # Shifted by −δ, all at once: x[b, δ, j] = f_bu[b, j + δ] (zero fill, weight 0 there).
    per = max(1, chunk_elements // max(1, b * d * j))
    stacked = shift_all(torch.stack([x_quad, x_clip, x_off, n0, ones]), -offsets)
    x_quad, x_clip, x_off, n0, ones = stacked.view(5, b, d, 1, j).unbind(0)  # (B, D, 1, J)
    phi_flat = phi.reshape(phi.shape[0], 1, t, j)  # (B|1, 1, T, J)
    parts = []
    for start in range(0, t, per):
        sides = _phi_side(c, phi_flat[:, :, start : start + per], ch, h, w)
        n = _n(x_quad, x_clip, x_off, *sides, scratch=None) - n0  # (B, D, T', J): 0 where φ = 0
        parts.append((n * ones).sum(dim=-1))  # (B, D, T')
    main = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]  # (B, D, T): Σ w (n − n0)
    return (base[:, None, None] - main).transpose(1, 2)  # (B, T, D)


def _phi_side(c: ClosedFormConstants, ph: torch.Tensor, ch: int, h: int, w: int):
    """The φ side of n for unshifted φ ``(…, J)``: a φ, κ p0 (λ − φ), ½ p0 relu(φ − λ⁻)²."""
    a_j = c.root_half_prec_c.expand(ch, h, w).reshape(-1)
    k_j = c.clip_td.expand(ch, h, w).reshape(-1)
    return a_j * ph, k_j * (c.threshold - ph), c.half_prec_td * (ph - c.below).clamp_min(0).square()


def _n(x_quad, x_clip, x_off, quad, clip, off, *, scratch: torch.Tensor | None) -> torch.Tensor:
    """n = min((x_quad − quad)² + relu(x_clip + clip)², x_off + off), broadcast.

    With ``scratch`` the result lives in it (two buffers of the result's size, no fresh
    allocation); without, plain operations (differentiable). Both run the same kernels, one
    correctly rounded operation each, so an element's value never depends on the path or on
    where it sits in the batch.
    """
    if scratch is None:
        n_on = (x_quad - quad).square() + (x_clip + clip).clamp_min(0).square()
        return torch.minimum(n_on, x_off + off)
    shape = torch.broadcast_shapes(x_quad.shape, quad.shape)
    size = math.prod(shape)
    n_on, n_clip = scratch[:size].view(shape), scratch[size : 2 * size].view(shape)
    torch.sub(x_quad, quad, out=n_on).square_()
    torch.add(x_clip, clip, out=n_clip).clamp_min_(0).square_()
    n_on.add_(n_clip)
    return torch.minimum(n_on, torch.add(x_off, off, out=n_clip), out=n_on)


def template_planes(
    c: ClosedFormConstants, phi: torch.Tensor, offsets: torch.Tensor
) -> torch.Tensor:
    """The template side of ``n`` for every template and offset: ``(3, T, D, C·H·W)``.

    ``phi``: ``(T, C, H, W)`` unshifted templates. The planes are a·φ', κ p0 (λ − φ') and
    ½ p0 relu(φ' − λ⁻)² of every shifted copy φ' (zero fill included). They depend on the
    model alone, so a caller may keep them while the templates and constants do not change.
    """
    (t, ch, h, w), d = phi.shape, offsets.shape[0]
    shifted = shift_all(phi, offsets).reshape(t, d, ch * h * w)  # (T, D, J)
    return torch.stack(_phi_side(c, shifted, ch, h, w))  # (3, T, D, J)
