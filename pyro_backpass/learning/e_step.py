"""Hard EM's E-step (paper §2.3.2): the best (γ, δ) of every object given its level's input and
its target F_td, by the layer-wise problem (11) without the bottom-up term::

    (γ_l, δ_l) = argmax log P(γ_l | parents) + log P(δ_l) + Σ_i log N(F^l_i; φ_i(U, γ, δ), σ0)

Per object, so a rank runs it on its own shard of the objects (:mod:`.hard_em`).
"""

from __future__ import annotations

import math

import torch

from pyro_backpass.model import TopDownStep

__all__ = ["e_step_level", "window_scores"]


def _windows(dy: int, dx: int, h: int, w: int):
    """φ's window and the target's window that meet at offset (dy, dx), or None if empty."""
    y0, y1, x0, x1 = max(0, -dy), min(h, h - dy), max(0, -dx), min(w, w - dx)
    if y0 >= y1 or x0 >= x1:
        return None
    return (slice(y0, y1), slice(x0, x1)), (slice(y0 + dy, y1 + dy), slice(x0 + dx, x1 + dx))


def window_scores(
    target: torch.Tensor, phi: torch.Tensor, offsets: torch.Tensor, *, scale_td: float
) -> torch.Tensor:
    """``Σ_i log N(F_i; shift(φ_k, δ)_i, σ0)`` for every component and offset: ``(B, K, D)``.

    ``‖F − shift(φ, δ)‖² = ‖F‖² − 2 ⟨F, shift(φ, δ)⟩ + ‖shift(φ, δ)‖²``; a zero-filled shift
    keeps the window of φ that stays on the map, so both terms are sums over one window per
    offset (no shifted copies).

    :param target: ``(B, C, H, W)`` F_td of the level. :param phi: ``(B, K, C, H, W)``.
    """
    b, k, (c, h, w) = phi.shape[0], phi.shape[1], phi.shape[-3:]
    sq_target = target.square().sum(dim=(-3, -2, -1))[:, None]  # (B, 1)
    out = phi.new_empty(b, k, offsets.shape[0])
    for d, (dy, dx) in enumerate(offsets.tolist()):
        win = _windows(dy, dx, h, w)
        if win is None:
            out[:, :, d] = sq_target
            continue
        (py, px), (ty, tx) = win
        pw = phi[..., py, px]  # (B, K, C, h', w')
        cross = (pw * target[:, None, :, ty, tx]).sum(dim=(-3, -2, -1))  # (B, K)
        out[:, :, d] = sq_target - 2 * cross + pw.square().sum(dim=(-3, -2, -1))
    norm = c * h * w * (math.log(scale_td) + 0.5 * math.log(2 * math.pi))
    return -0.5 * out.clamp_min(0) / scale_td**2 - norm


@torch.no_grad()
def e_step_level(
    step: TopDownStep,
    upper: torch.Tensor,
    target: torch.Tensor,
    *,
    log_prior_gamma: torch.Tensor | None = None,
    log_prior_delta: torch.Tensor | None = None,
    batch_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The E-step of one level: the best (γ, δ) of every object given its input and target.

    :param upper: the level's input (category indices ``(B,)`` for the top level's templates).
    :param target: ``(B, C, H, W)`` F_td of the level.
    :param log_prior_gamma: ``(B, K)`` log P(γ | parents) (None: uniform).
    :param log_prior_delta: ``(D,)`` log P(δ) (None: uniform).
    :param batch_size: objects per chunk (φ of all K components is made per chunk).
    :returns: ``(γ, δ, score)``, each ``(B,)``; ties go to the lowest flat index (γ, then δ).
    """
    bests, flats = [], []
    for start in range(0, target.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        phi = step.phi_all(upper[sl])  # (B', K, C, H, W)
        scores = window_scores(target[sl], phi, step.offsets, scale_td=float(step.scale_td))
        if log_prior_gamma is not None:
            scores = scores + log_prior_gamma[sl, :, None]
        if log_prior_delta is not None:
            scores = scores + log_prior_delta[None, None, :]
        best, flat = scores.reshape(scores.shape[0], -1).max(dim=-1)  # first maximum
        bests.append(best), flats.append(flat)
    best, flat = torch.cat(bests), torch.cat(flats)
    d = step.num_offsets
    return flat // d, flat % d, best
