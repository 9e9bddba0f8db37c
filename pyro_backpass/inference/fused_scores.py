"""Opt-in fused kernels for the backward pass: ``torch.compile`` of the hypothesis scores'
per-element sum and of the winner's closed form.

The eager kernels of :mod:`~pyro_backpass.inference.hypotheses` make about ten passes over each
cache-sized block of (images × hypotheses × elements), one per operation. Compiled, the same
closed form becomes one loop per offset that reads φ and a window of the image once and keeps
every intermediate in registers (measured ~5× faster on the default model's levels, one CPU
thread); the top level's shared templates are compared as contiguous planes (one offset per
row: 56 → 15 ms on the default top level, batch 32), and the winner's closed form
(:func:`~pyro_backpass.inference.closed_form.closed_form_with`) is one loop too. Opt in with
``PYRO_BACKPASS_COMPILE=1``: the first call for each kind of level (per-image φ, shared
templates; one offset or many) compiles, which costs seconds (``benchmarks/backward_pass.py``
reports it); without a working compiler the eager path runs.

The values are those of the eager path up to float rounding (the compiler may contract
multiply-adds and sums in another order). One property is kept exactly: an element whose φ is 0
contributes exactly 0 (an explicit select, not a difference of equal roundings), so a dead
component ties at every offset and ties still go to the lowest index.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F

from pyro_backpass.model.observation import ClosedFormConstants

__all__ = [
    "compile_enabled",
    "compiled_closed_form",
    "compiled_scores",
    "compiled_shared_scores",
]

_ENV = "PYRO_BACKPASS_COMPILE"
_failed = False
_MAX_LEVEL_SHAPES = 64


def compile_enabled() -> bool:
    """Whether the compiled kernel is asked for (``PYRO_BACKPASS_COMPILE=1``) and still usable."""
    return not _failed and os.environ.get(_ENV, "") not in ("", "0")


def _scores(bu, wt, phi, a, clip_on, thr, bg, half_off, k_diff, clip_td, below, half_td, k_on,
            log_norm_td, offsets: tuple[tuple[int, int], ...], pad: int):  # fmt: skip
    """``Σ_i s0_i − Σ_j w (n(f_bu[j + δ], φ[j]) − n(f_bu[j + δ], 0))`` for every δ: ``(B, T, D)``.

    ``bu``, ``wt``: ``(B, C, H + 2p, W + 2p)`` image and observed weights, zero-padded (a 0-dim
    (1, 1, 1, 1) 1 for ``wt`` when every element is observed and ``p = 0``);
    ``phi``: ``(B|1, T, C, H, W)``. The n of :func:`~pyro_backpass.inference.hypotheses._n`
    written out: image side, φ side and the minimum in one expression per offset.
    """
    h, w = phi.shape[-2:]
    # Image side, (B, 1, C, H+2p, W+2p) each, zero-filled (weight 0) outside the map:
    # a f_bu, κ p1 (λ − f_bu), ½ p2 (f_bu − β)² + ΔK.
    x, ws = bu.unsqueeze(1), wt.unsqueeze(1)
    x_quad = a * x
    x_clip = clip_on * (thr - x)
    x_off = half_off * (x - bg).square() + k_diff
    # φ side, (B|1, T, C, H, W) each: a φ, κ p0 (λ − φ), ½ p0 relu(φ − λ⁻)².
    quad = a * phi
    clip = clip_td * (thr - phi)
    off = half_td * (phi - below).clamp_min(0).square()
    clip0 = clip_td * thr  # the φ side at φ = 0 (quad = off = 0 there)

    def n0_of(xq, xc, xo):
        return torch.minimum(xq.square() + (xc + clip0).clamp_min(0).square(), xo)

    # Σ_i s0_i, (B,): observed elements score K_on − n0, the others log N(φ; φ, σ0).
    inner = (..., slice(pad, pad + h), slice(pad, pad + w))
    wi = ws[inner]
    s0 = wi * (k_on - n0_of(x_quad[inner], x_clip[inner], x_off[inner])) + (1 - wi) * log_norm_td
    base = s0.sum(dim=(-3, -2, -1))  # (B, 1)
    sums = []
    live = phi != 0
    for dy, dx in offsets:
        win = (..., slice(pad + dy, pad + dy + h), slice(pad + dx, pad + dx + w))
        xq, xc, xo = x_quad[win], x_clip[win], x_off[win]
        n = torch.minimum((xq - quad).square() + (xc + clip).clamp_min(0).square(), xo + off)
        # An element whose φ is 0 contributes exactly 0: a dead component ties at every δ.
        diff = torch.where(live, ws[win] * (n - n0_of(xq, xc, xo)), 0)
        sums.append(base - diff.sum(dim=(-3, -2, -1)))  # (B, T)
    return torch.stack(sums, dim=-1)  # (B, T, D)


@functools.cache
def _compiled(fn):
    # Static shapes: one compiled loop per level shape (measured 5-10× faster than one
    # symbolic-size loop for all), so allow a compile per level of a deep model.
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, _MAX_LEVEL_SHAPES)
    return torch.compile(fn, dynamic=False)


def _run(fn, *args):
    """``fn`` compiled, on ``args``; None (and the eager path from now on) if compiling fails."""
    global _failed
    try:
        return _compiled(fn)(*args)
    except Exception as err:  # no C++ compiler, an unsupported device: the eager path
        _failed = True
        warnings.warn(f"{_ENV}: compiling {fn.__name__} failed, eager from now on ({err!r})",
                      RuntimeWarning, stacklevel=3)  # fmt: skip
        return None


def _tensors(like: torch.Tensor, values) -> list[torch.Tensor]:
    # Every constant as a tensor: a number would be baked into the compiled code, and another
    # level's constants would compile again.
    return [like.new_tensor(v) if not isinstance(v, torch.Tensor) else v.to(like.dtype)
            for v in values]  # fmt: skip


def compiled_scores(
    c: ClosedFormConstants,
    phi: torch.Tensor,
    offsets: torch.Tensor,
    bu: torch.Tensor,
    weight: torch.Tensor | None,
) -> torch.Tensor | None:
    """``Σ_i log_score_i`` of every hypothesis ``(t, δ)``: ``(B, T, D)``, as
    :func:`~pyro_backpass.inference.hypotheses.hypothesis_scores`; None when the compiled
    kernel is unavailable (the caller then runs the eager path).

    :param phi: ``(B|1, T, C, H, W)`` unshifted φ. :param offsets: ``(D, 2)`` long.
    :param bu: ``(B, C, H, W)``, harmless values where unobserved. :param weight: None or the
        ``(B, C, H, W)`` float observed mask.
    """
    offs = tuple((int(dy), int(dx)) for dy, dx in offsets.tolist())
    pad = max((abs(v) for pair in offs for v in pair), default=0)
    h, w = phi.shape[-2:]
    if pad >= max(h, w):  # shifts that leave the map: clip them to one map width
        offs = tuple((max(-h, min(h, dy)), max(-w, min(w, dx))) for dy, dx in offs)
        pad = max(h, w)
    consts = _tensors(bu, (c.root_half_prec_c, c.clip_on, c.threshold, c.background,
                           c.half_prec_off, c.const_on - c.const_off, c.clip_td, c.below,
                           c.half_prec_td, c.const_on, c.log_norm_td))  # fmt: skip
    # Strided views (an unpool's phase maps) copied first: read in place by the compiled loop
    # they were measured 5× slower than the copy and the loop together.
    phi, bu = phi.contiguous(), bu.contiguous()
    weight = None if weight is None else weight.contiguous()
    # Padded here, not in the compiled code: masked loads there were measured 5× slower.
    wt = bu.new_ones(1, 1, 1, 1) if weight is None and pad == 0 else weight
    if pad:
        wt = bu.new_ones(1, 1, 1, 1) if wt is None else wt
        wt = wt.expand(bu.shape)
        bu, wt = F.pad(bu, (pad,) * 4), F.pad(wt, (pad,) * 4)  # (B, C, H+2p, W+2p)
    return _run(_scores, bu, wt, phi, *consts, offs, pad)


def _closed_form(bu, phi, obs, threshold, below, background, log_norm_td, half_prec_td,
                 half_prec_off, const_off, weight_on, weight_td, half_prec_on,
                 const_on):  # fmt: skip
    """:func:`~pyro_backpass.inference.closed_form.closed_form_with`'s body as one loop: the same
    operations in the same order (selections by ``where``: exact either way)."""
    if obs is not None:
        bu = torch.where(obs, bu, background)
    f_on = torch.maximum(weight_on * bu + weight_td * phi, threshold)
    f_off = torch.minimum(phi, below)
    score_on = const_on - (
        half_prec_on * (bu - f_on).square() + half_prec_td * (f_on - phi).square()
    )
    score_off = const_off - (
        half_prec_off * (bu - background).square() + half_prec_td * (f_off - phi).square()
    )
    f_td = torch.where(score_on >= score_off, f_on, f_off)
    log_score = torch.maximum(score_on, score_off)
    if obs is not None:
        f_td = torch.where(obs, f_td, phi)
        log_score = torch.where(obs, log_score, log_norm_td)
    return f_td, log_score


def compiled_closed_form(
    c: ClosedFormConstants, bu: torch.Tensor, phi: torch.Tensor, observed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(f_td, log_score)`` of the closed form for ``bu`` and ``phi`` of one shape, as
    :func:`~pyro_backpass.inference.closed_form.closed_form_with`, in one compiled loop (up to
    float rounding; the selections are exact); None when compiling is unavailable.

    :param observed: None or a bool mask broadcastable to ``phi``.
    """
    consts = _tensors(bu, (c.threshold, c.below, c.background, c.log_norm_td, c.half_prec_td,
                           c.half_prec_off, c.const_off, c.weight_on, c.weight_td,
                           c.half_prec_on, c.const_on))  # fmt: skip
    obs = None if observed is None else observed.to(torch.bool)
    return _run(_closed_form, bu, phi, obs, *consts)


def _shared_scores(x_quad, x_clip, x_off, wt, quad, clip, off, const):
    """``const − Σ_j w n(x_j, plane_j)`` for every template row: ``(B, R)``; ``x_*``, ``wt``:
    ``(B|1, 1, J)``, planes ``(1, R, J)`` (:func:`~pyro_backpass.inference.hypotheses._n`)."""
    n = torch.minimum((x_quad - quad).square() + (x_clip + clip).clamp_min(0).square(), x_off + off)
    return const - (n * wt).sum(dim=-1)


def compiled_shared_scores(
    planes: torch.Tensor,
    sides: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    weight: torch.Tensor | None,
    const: torch.Tensor,
) -> torch.Tensor | None:
    """Scores ``(B, T, D)`` against template planes ``(3, T, D, J)`` shared by all images (the
    top level's, :func:`~pyro_backpass.inference.hypotheses.template_planes`), in one compiled
    loop; None when compiling is unavailable.

    :param sides: the image side ``(B, C, H, W)`` each: a f_bu, κ p1 (λ − f_bu), ½ p2 (f_bu − β)²
        + K_on − K_off. :param weight: None or the ``(B, C, H, W)`` observed weights.
    :param const: Σ_i of the scores at n = 0, ``()`` or ``(B, 1)``.
    """
    _, t, d, j = planes.shape
    b = sides[0].shape[0]
    x = [v.reshape(b, 1, j) for v in sides]
    wt = planes.new_ones(1, 1, 1) if weight is None else weight.reshape(b, 1, j)
    rows = planes.reshape(3, 1, t * d, j)
    out = _run(_shared_scores, *x, wt, rows[0], rows[1], rows[2], const)  # (B, T*D)
    return None if out is None else out.reshape(b, t, d)
