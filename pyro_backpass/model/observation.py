"""Per-level parameters of the observation model P(F_bu | F_td), eq. (9) of the paper, and the
constants that the closed form of eq. (13) derives from them."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from pyro_backpass.levels import LevelSpec
from pyro_backpass.model.thresholded_gaussian import HALF_LOG_2PI, ThresholdedGaussian

__all__ = ["ClosedFormConstants", "Observation", "Scalar", "closed_form_constants"]

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
    log_norm_td = -log_s0 - HALF_LOG_2PI
    return ClosedFormConstants(
        threshold=lam,
        below=below,
        background=beta,
        log_norm_td=log_norm_td,
        half_prec_td=0.5 * p0,
        half_prec_off=0.5 * p2,
        const_off=log_norm_td - log_s2 - HALF_LOG_2PI,
        weight_on=p1 / total,
        weight_td=p0 / total,
        half_prec_on=0.5 * p1,
        const_on=(log_norm_td - HALF_LOG_2PI) - s1.log(),
        root_half_prec_c=kappa * (p1 * p0).sqrt(),
        clip_on=kappa * p1,
        clip_td=kappa * p0,
    )


class Observation(nn.Module):
    """λ (a scalar), β and σ2 (a scalar each, or one per channel) and σ1 (one per channel) of
    one level, as buffers.

    :param spec: the level. Channel-specific σ1 is what the paper found robust to clutter.
    :param background, scale_off: β and σ2: one number for the level, or ``C`` values (stored
        ``(C, 1, 1)``): a background per channel (:func:`~pyro_backpass.learning.fit_background`
        fits them; issue #10 measured that it ranks the true object higher in clutter).
    :param mask_threshold: the value of F̂_td from which an element counts as the object's in
        :attr:`MapResult.mask` (default: λ). It is a choice about masks, not part of the
        probability model, and is tuned on its own (the learning issue measured a higher value
        than the observation model's λ to give better masks).
    """

    def __init__(
        self,
        spec: LevelSpec,
        *,
        threshold: float = 0.5,
        background: float | torch.Tensor = 0.0,
        scale_on: float | torch.Tensor = 0.3,
        scale_off: float | torch.Tensor = 0.3,
        mask_threshold: float | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        scale_on = self._per_channel("scale_on", scale_on, always=True)
        for name, value in (("scale_on", scale_on), ("scale_off", scale_off)):
            if not (torch.as_tensor(value) > 0).all():
                raise ValueError(f"{spec.name}: {name} must be > 0")
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer("background", self._per_channel("background", background))
        self.register_buffer("scale_on", scale_on)  # (C, 1, 1)
        self.register_buffer("scale_off", self._per_channel("scale_off", scale_off))
        mask = threshold if mask_threshold is None else mask_threshold
        self.register_buffer("mask_threshold", torch.tensor(float(mask)))

    def _per_channel(self, name: str, value, *, always: bool = False) -> torch.Tensor:
        """A parameter as a 0-dim tensor (one number, unless ``always``) or ``(C, 1, 1)``."""
        c = self.spec.channels
        t = torch.as_tensor(value, dtype=torch.get_default_dtype()).detach()
        if t.numel() not in (1, c):
            raise ValueError(f"{self.spec.name}: {name} needs 1 or {c} values, got {t.numel()}")
        if t.numel() == 1 and not always:
            return t.reshape(()).clone()
        return t.reshape(-1).expand(c).reshape(c, 1, 1).clone()

    def per_channel_background(self) -> None:
        """Make β and σ2 ``(C, 1, 1)`` buffers (same values), so that they can be fitted per
        channel; a no-op if they are already."""
        c = self.spec.channels
        for name in ("background", "scale_off"):
            value = getattr(self, name)
            if value.dim() == 0:
                setattr(self, name, value.reshape(1, 1, 1).expand(c, 1, 1).clone())

    def distribution(self, td: torch.Tensor) -> ThresholdedGaussian:
        """``P(f_bu | f_td)`` element-wise, batch shape ``td.shape`` (``(..., C, H, W)``)."""
        return ThresholdedGaussian(
            td,
            threshold=self.threshold,
            background=self.background,
            scale_on=self.scale_on,
            scale_off=self.scale_off,
        )

    def constants(self, scale_td: torch.Tensor) -> ClosedFormConstants:
        """This level's closed-form constants, to pass as ``constants=`` below.

        Cached: copies of the parameters they were made from are kept and compared with the
        current ones on every call (five equality tests, instead of the ~30 operations that
        make them), so in-place edits, new buffers and ``.to(...)`` all give fresh constants.
        Where a gradient must flow through a parameter, nothing is cached.
        """
        raw = (self.threshold, self.background, self.scale_on, self.scale_off, scale_td)

        def make() -> ClosedFormConstants:
            return closed_form_constants(
                threshold=self.threshold, background=self.background, scale_td=scale_td,
                scale_on=self.scale_on, scale_off=self.scale_off, like=self.threshold,
            )  # fmt: skip

        if torch.is_grad_enabled() and any(t.requires_grad for t in raw):
            return make()
        # Normal tensors even inside inference mode, so the cache serves both modes (and no
        # autograd graph: leaving inference mode turns grad mode back on).
        cached = self.__dict__.get("_constants_cache")
        if (
            cached is not None
            and all(
                (a.shape, a.dtype, a.device) == (b.shape, b.dtype, b.device)
                for a, b in zip(cached[0], raw, strict=True)
            )
            and all(torch.equal(a, b) for a, b in zip(cached[0], raw, strict=True))
        ):
            return cached[1]
        with torch.inference_mode(False), torch.no_grad():
            constants = make()
            self.__dict__["_constants_cache"] = (tuple(t.clone() for t in raw), constants)
        return constants
