"""Closed-form per-element maximisation of the backward pass, eq. (13) of the paper."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from pyro_backpass.cache_blocks import block_elements

__all__ = [
    "ClosedFormConstants",
    "closed_form_constants",
    "closed_form_score",
    "closed_form_td",
]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


Scalar = float | torch.Tensor  # a Python float, or a 0-dim tensor where gradients are needed


class ClosedFormConstants(NamedTuple):
    """One level's observation parameters and the constants the closed form derives from them.

    Made once per level by :func:`closed_form_constants` (e.g. once per greedy pass) instead of
    once per call. Precisions p = σ⁻²; entries that involve σ1 are ``(C, 1, 1)`` tensors (σ1 is
    per channel), the others Python floats unless a gradient must flow through them.
    """

    threshold: Scalar  # λ
    below: Scalar  # the largest float below λ (the off-branch boundary)
    background: Scalar  # β
    log_norm_td: Scalar  # log N(φ; φ, σ0)
    half_prec_td: Scalar  # ½ p0
    half_prec_off: Scalar  # ½ p2
    const_off: Scalar  # log N(0; 0, σ0) + log N(0; 0, σ2)
    weight_on: torch.Tensor  # p1 / (p0 + p1): η = weight_on f_bu + weight_td φ
    weight_td: torch.Tensor  # p0 / (p0 + p1)
    half_prec_on: torch.Tensor  # ½ p1
    const_on: torch.Tensor  # log N(0; 0, σ0) + log N(0; 0, σ1)
    # For hypothesis_scores' form: ½ p_c (f_bu − φ)² = (a f_bu − a φ)², a = √(½ p0 p1 / (p0 + p1)),
    # and ½ (p0 + p1) relu(λ − η)² = relu(κ p1 (λ − f_bu) + κ p0 (λ − φ))², κ = √(½ / (p0 + p1)).
    root_half_prec_c: torch.Tensor  # a
    clip_on: torch.Tensor  # κ p1
    clip_td: torch.Tensor  # κ p0


def _needs_grad(v) -> bool:
    return isinstance(v, torch.Tensor) and v.requires_grad and torch.is_grad_enabled()


def closed_form_constants(
    *,
    threshold: torch.Tensor | float,
    background: torch.Tensor | float,
    scale_td: torch.Tensor | float,
    scale_on: torch.Tensor | float,
    scale_off: torch.Tensor | float,
    like: torch.Tensor,
) -> ClosedFormConstants:
    """:class:`ClosedFormConstants` in ``like``'s dtype and device.

    The scalar parameters (λ, β, σ0, σ2) are read as numbers, rounded to ``like``'s dtype, so
    the derived scalars cost no tensor operations; if any of them needs a gradient, all stay
    tensors.
    """

    def as_t(v):
        return torch.as_tensor(v, dtype=like.dtype, device=like.device)

    s1 = as_t(scale_on)
    scalars = (threshold, background, scale_td, scale_off)
    if any(_needs_grad(v) or (isinstance(v, torch.Tensor) and v.numel() != 1) for v in scalars):
        # Gradients through the parameters, or element-wise parameters: tensors throughout.
        lam, beta, s0, s2 = (as_t(v) for v in scalars)
        below = torch.nextafter(lam, lam.new_tensor(-math.inf))
        log_s0, log_s2 = s0.log(), s2.log()
    else:
        # One small CPU tensor rounds all four to the dtype (and gives λ's float below).
        vals = torch.tensor([float(v) for v in scalars], dtype=like.dtype)
        lam, beta, s0, s2 = vals.tolist()
        for name, v in (("threshold λ", lam), ("background β", beta)):
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v}")
        for name, v in (("scale_td σ0", s0), ("scale_off σ2", s2)):
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be finite and > 0, got {v}")
        below = float(torch.nextafter(vals[0], vals.new_tensor(-math.inf)))
        log_s0, log_s2 = math.log(s0), math.log(s2)
    p0, p2 = s0**-2, s2**-2
    p1 = s1.pow(-2)
    total = p1 + p0
    kappa = (0.5 / total).sqrt()
    log_norm_td = -log_s0 - _HALF_LOG_2PI
    return ClosedFormConstants(
        threshold=lam,
        below=below,
        background=beta,
        log_norm_td=log_norm_td,
        half_prec_td=0.5 * p0,
        half_prec_off=0.5 * p2,
        const_off=log_norm_td - log_s2 - _HALF_LOG_2PI,
        weight_on=p1 / total,
        weight_td=p0 / total,
        half_prec_on=0.5 * p1,
        const_on=(log_norm_td - _HALF_LOG_2PI) - s1.log(),
        root_half_prec_c=kappa * (p1 * p0).sqrt(),
        clip_on=kappa * p1,
        clip_td=kappa * p0,
    )


def closed_form_td(
    bu: torch.Tensor | None,
    phi: torch.Tensor,
    *,
    threshold: torch.Tensor | float,
    background: torch.Tensor | float,
    scale_td: torch.Tensor | float,
    scale_on: torch.Tensor | float,
    scale_off: torch.Tensor | float,
    observed: torch.Tensor | bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The maximiser over ``f_td`` of one element's terms, and the maximum, in closed form.

    For each element this solves::

        max_{f_td}  log P(f_bu | f_td) + log N(f_td; phi, scale_td)

    with the thresholded-Gaussian ``P(f_bu | f_td)`` of eq. (9). On the range ``f_td >= λ`` the
    maximiser is the precision-weighted mid-point clipped up to λ::

        η = (σ0² f_bu + σ1² φ) / (σ0² + σ1²),   f_on = max(η, λ)

    and on ``f_td < λ`` it is ``φ`` clipped down to λ (footnote 2: the boundary may be taken on
    both ranges). The better of the two wins, compared with full log-densities (σ1 ≠ σ2, so the
    normalising constants matter). An off-range boundary value is returned as the largest float
    below λ, which realises the supplement's boundary coin: the plain
    :class:`~pyro_backpass.ThresholdedGaussian` then scores the returned ``f_td`` on the branch
    the maximisation chose, so the Pyro model's log-density of the result equals ``log_score``.

    Where ``observed`` is False (or ``bu`` is None) the element has no observation term:
    ``f_td = φ`` and ``log_score = log N(φ; φ, σ0)``.

    :param bu: bottom-up activations ``f_bu``, broadcastable with ``phi``; or None.
    :param phi: top-down prediction ``φ``.
    :param threshold: λ. :param background: β. :param scale_td: σ0.
    :param scale_on: σ1 (e.g. per channel, ``(C, 1, 1)``). :param scale_off: σ2.
    :param observed: bool mask broadcastable with ``phi``, or a bool, or None (= all observed).
    :returns: ``(f_td, log_score)``, both shaped like the broadcast of the inputs.
    """
    c = closed_form_constants(
        threshold=threshold, background=background, scale_td=scale_td, scale_on=scale_on,
        scale_off=scale_off, like=phi,
    )  # fmt: skip
    return closed_form_with(c, bu, phi, observed=observed)


def closed_form_with(
    c: ClosedFormConstants,
    bu: torch.Tensor | None,
    phi: torch.Tensor,
    *,
    observed: torch.Tensor | bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`closed_form_td` with the constants made beforehand (the hot path's entry).

    Large inputs without gradients run in cache-sized blocks along the leading dimension:
    every step is element-wise and correctly rounded, so the values are the same to the bit,
    without a dozen full-size temporaries travelling through memory.
    """
    if bu is None or observed is False:
        return phi, _full_like(phi, c.log_norm_td)
    tensors = [v for v in (bu, phi, observed) if isinstance(v, torch.Tensor)]
    shape = torch.broadcast_shapes(*(v.shape for v in tensors))
    block = block_elements(phi.element_size())
    if (
        len(shape) > 1
        and math.prod(shape) > 2 * block
        and not (torch.is_grad_enabled() and any(v.requires_grad for v in (*tensors, *c)
                                                 if isinstance(v, torch.Tensor)))
    ):  # fmt: skip
        per = max(1, block // math.prod(shape[1:]))
        bu_e, phi_e = bu.expand(shape), phi.expand(shape)
        obs_e = observed.expand(shape) if isinstance(observed, torch.Tensor) else observed
        f_td = s = None
        for r0 in range(0, shape[0], per):
            part = slice(r0, r0 + per)
            obs = obs_e[part] if isinstance(obs_e, torch.Tensor) else obs_e
            f, sc = _closed_form_core(c, bu_e[part], phi_e[part], observed=obs)
            if f_td is None:
                f_td, s = f.new_empty(shape), sc.new_empty(shape)
            f_td[part], s[part] = f, sc
        return f_td, s
    return _closed_form_core(c, bu, phi, observed=observed)


def _closed_form_core(c, bu, phi, *, observed):
    """The body of :func:`closed_form_with`, on one block."""
    masked = observed is not None and observed is not True
    if masked:
        observed = torch.as_tensor(observed, dtype=torch.bool, device=phi.device)
        # Unobserved elements are scored as φ alone below; give them a harmless f_bu first, so
        # no huge value there can overflow into a NaN.
        bu = _select(observed, bu, c.background)
    # On-branch: the precision-weighted mid-point η, clipped up to λ.
    f_on = (c.weight_on * bu + c.weight_td * phi).clamp_min(c.threshold)
    # Off-branch: the observation no longer depends on f_td, so the prior's mode wins, clipped
    # down to the branch's range; its boundary is the float just below λ (see closed_form_td).
    f_off = phi.clamp_max(c.below)
    # score = const − ½p_obs (bu − ·)² − ½p0 (f − φ)². Every step is its own correctly rounded
    # kernel (no fused multiply-add, whose rounding may differ between a kernel's vector and
    # scalar loops), so an element's value does not depend on where it sits in the batch.
    score_on = c.const_on - (
        c.half_prec_on * (bu - f_on).square() + c.half_prec_td * (f_on - phi).square()
    )
    score_off = c.const_off - (
        c.half_prec_off * (bu - c.background).square() + c.half_prec_td * (f_off - phi).square()
    )
    take_on = score_on >= score_off
    f_td = f_on * take_on + f_off * ~take_on  # exact selection of finite values (see _select)
    log_score = torch.maximum(score_on, score_off)  # the same as selecting by take_on
    if masked:
        f_td = _select(observed, f_td, phi)
        log_score = _select(observed, log_score, c.log_norm_td)
    return f_td, log_score


def _full_like(x: torch.Tensor, value: Scalar) -> torch.Tensor:
    """``value`` (a number or a 0-dim tensor) in ``x``'s shape, contiguous (so sums over it
    round the same however a caller slices it)."""
    return x.new_zeros(()).add(value).expand_as(x).contiguous()


def _select(cond: torch.Tensor, a: torch.Tensor, b) -> torch.Tensor:
    """``torch.where(cond, a, b)`` for finite values, bit for bit (a·1 + b·0 = a exactly).

    Arithmetic, because the CPU kernel of ``torch.where`` is not vectorised (measured ~20×
    slower than ``torch.maximum`` on the same tensors) and this is the hot path.
    """
    on = cond.to(a.dtype)
    return a * on + b * (1 - on)


def closed_form_score(
    bu: torch.Tensor | None,
    phi: torch.Tensor,
    *,
    threshold: torch.Tensor | float,
    background: torch.Tensor | float,
    scale_td: torch.Tensor | float,
    scale_on: torch.Tensor | float,
    scale_off: torch.Tensor | float,
    observed: torch.Tensor | bool | None = None,
) -> torch.Tensor:
    """``closed_form_td(...)[1]`` alone."""
    c = closed_form_constants(
        threshold=threshold, background=background, scale_td=scale_td, scale_on=scale_on,
        scale_off=scale_off, like=phi,
    )  # fmt: skip
    return closed_form_with(c, bu, phi, observed=observed)[1]
