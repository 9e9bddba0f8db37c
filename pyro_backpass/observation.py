"""Per-level parameters of the observation model P(F_bu | F_td), eq. (9) of the paper."""

from __future__ import annotations

import torch
from torch import nn

from pyro_backpass.closed_form import (
    ClosedFormConstants,
    closed_form_constants,
    closed_form_td,
    closed_form_with,
)
from pyro_backpass.hypothesis_scores import hypothesis_scores, hypothesis_scores_with
from pyro_backpass.levels import LevelSpec
from pyro_backpass.thresholded_gaussian import ThresholdedGaussian

__all__ = ["Observation"]


class Observation(nn.Module):
    """λ, β, σ2 (scalars) and σ1 (one per channel) of one level, as buffers.

    :param spec: the level. Channel-specific σ1 is what the paper found robust to clutter.
    """

    def __init__(
        self,
        spec: LevelSpec,
        *,
        threshold: float = 0.5,
        background: float = 0.0,
        scale_on: float | torch.Tensor = 0.3,
        scale_off: float = 0.3,
    ) -> None:
        super().__init__()
        self.spec = spec
        scale_on = torch.as_tensor(scale_on, dtype=torch.get_default_dtype())
        if scale_on.numel() not in (1, spec.channels):
            raise ValueError(f"{spec.name}: scale_on needs 1 or {spec.channels} values")
        scale_on = scale_on.reshape(-1).expand(spec.channels).reshape(spec.channels, 1, 1).clone()
        for name, value in (("scale_on", scale_on), ("scale_off", scale_off)):
            if not (torch.as_tensor(value) > 0).all():
                raise ValueError(f"{spec.name}: {name} must be > 0")
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer("background", torch.tensor(float(background)))
        self.register_buffer("scale_on", scale_on)  # (C, 1, 1)
        self.register_buffer("scale_off", torch.tensor(float(scale_off)))

    def distribution(self, td: torch.Tensor) -> ThresholdedGaussian:
        """``P(f_bu | f_td)`` element-wise, batch shape ``td.shape`` (``(..., C, H, W)``)."""
        return ThresholdedGaussian(
            td,
            threshold=self.threshold,
            background=self.background,
            scale_on=self.scale_on,
            scale_off=self.scale_off,
        )

    def _params(self, scale_td: torch.Tensor, observed: torch.Tensor | None) -> dict:
        return dict(
            threshold=self.threshold,
            background=self.background,
            scale_td=scale_td,
            scale_on=self.scale_on,
            scale_off=self.scale_off,
            observed=observed,
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

    def closed_form(
        self,
        bu: torch.Tensor | None,
        phi: torch.Tensor,
        *,
        scale_td: torch.Tensor,
        observed: torch.Tensor | None = None,
        constants: ClosedFormConstants | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`~pyro_backpass.closed_form_td` with this level's parameters.

        ``constants``: :meth:`constants` made beforehand (the same values, fewer operations).
        """
        if constants is not None:
            return closed_form_with(constants, bu, phi, observed=observed)
        return closed_form_td(bu, phi, **self._params(scale_td, observed))

    def hypothesis_scores(
        self,
        bu: torch.Tensor | None,
        phi: torch.Tensor,
        offsets: torch.Tensor,
        *,
        scale_td: torch.Tensor,
        observed: torch.Tensor | None = None,
        chunk_elements: int = 2**22,
        constants: ClosedFormConstants | None = None,
        planes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """:func:`~pyro_backpass.hypothesis_scores.hypothesis_scores` with this level's
        parameters: ``Σ_i log_score_i`` of every unshifted ``phi`` ``(B|1, T, C, H, W)`` at every
        offset, ``(B, T, D)`` (greedy's hypothesis scoring)."""
        if constants is not None:
            return hypothesis_scores_with(
                constants, bu, phi, offsets, observed=observed, chunk_elements=chunk_elements,
                planes=planes,
            )  # fmt: skip
        return hypothesis_scores(
            bu, phi, offsets, chunk_elements=chunk_elements, **self._params(scale_td, observed)
        )
