"""Closed-form per-element maximisation of the backward pass, eq. (13) of the paper."""

from __future__ import annotations

import math

import torch

from pyro_backpass.inference.cache_blocks import block_elements
from pyro_backpass.inference.fused_scores import compile_enabled, compiled_closed_form
from pyro_backpass.model.observation import ClosedFormConstants, Scalar, closed_form_constants

__all__ = [
    "as_mask",
    "closed_form_td",
    "closed_form_with",
    "select",
]


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
    """:func:`closed_form_td` with one level's constants made beforehand (e.g.
    ``gm.observations[name].constants(scale_td)``): the entry of greedy, exact MAP and
    :func:`~pyro_backpass.log_joint`.

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
        if compile_enabled() and bu.shape == phi.shape and observed is not True:
            # Opt-in (fused_scores.py): one compiled loop, e.g. greedy's winner per level.
            fused = compiled_closed_form(c, bu, phi, observed)
            if fused is not None:
                return fused
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
        # One 0/1 float mask for the three selections below (see select).
        observed = as_mask(observed, like=phi)
        # Unobserved elements are scored as φ alone below; give them a harmless f_bu first, so
        # no huge value there can overflow into a NaN.
        bu = select(observed, bu, c.background)
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
    # The on-branch wins where score_on ≥ score_off: for finite floats a − b ≥ 0 exactly when
    # a ≥ b, so sign(score_on − score_off) + 1, clipped to 1, is that test as a 0/1 float mask,
    # made by float kernels alone (see select for why not a bool).
    take_on = (score_on - score_off).sign_().add_(1).clamp_max_(1)
    f_td = select(take_on, f_on, f_off)  # exact selection of finite values
    log_score = torch.maximum(score_on, score_off)  # the same as selecting by take_on
    if masked:
        f_td = select(observed, f_td, phi)
        log_score = select(observed, log_score, c.log_norm_td)
    return f_td, log_score


def _full_like(x: torch.Tensor, value: Scalar) -> torch.Tensor:
    """``value`` (a number or a 0-dim tensor) in ``x``'s shape, contiguous (so sums over it
    round the same however a caller slices it)."""
    return x.new_zeros(()).add(value).expand_as(x).contiguous()


def as_mask(cond: torch.Tensor | bool, *, like: torch.Tensor) -> torch.Tensor:
    """``cond`` as a 0/1 mask of ``like``'s dtype and device, for :func:`select` (convert a
    bool mask once, not at every selection)."""
    cond = torch.as_tensor(cond, device=like.device)
    return cond if cond.dtype == like.dtype else cond.to(like.dtype)


def select(cond: torch.Tensor, a: torch.Tensor, b) -> torch.Tensor:
    """``torch.where(cond, a, b)`` for finite values, bit for bit (a·1 + b·0 = a exactly).

    ``cond``: a bool mask or, cheaper, a 0/1 mask of ``a``'s dtype (:func:`as_mask`).
    Arithmetic on floats, because on CPU every kernel that touches a bool tensor is slow: on
    262,144 float32 elements, one thread, ``torch.where`` took ~20×, a bool → float conversion
    ~7×, float × bool and a comparison ~4–5× the time of a float multiply, and the closed form's
    branch selection 1.4 ms with a bool mask against 0.4 ms with a float one
    (``benchmarks/bool_kernels.py``); this is the hot path.
    """
    on = cond if cond.dtype == a.dtype else cond.to(a.dtype)
    return a * on + b * (1 - on)
