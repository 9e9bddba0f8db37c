"""The element-wise observation model of the paper, eq. (9), as a Pyro distribution."""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

__all__ = ["HALF_LOG_2PI", "ThresholdedGaussian"]

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class ThresholdedGaussian(TorchDistribution):
    r"""A scene's bottom-up activation given one object's top-down activation.

    If the object alone activates the node beyond the threshold, the scene's activation is a
    Gaussian around the object's; otherwise it is a background Gaussian::

        f_bu | f_td  ~  Normal(f_td, scale_on)         if f_td >= threshold
                        Normal(background, scale_off)  otherwise

    Both scales are standard deviations. The distribution is over ``f_bu`` (support: the reals);
    ``f_td`` is a parameter. The paper's supplement lets the branch at ``f_td == threshold`` be
    chosen by a coin; :func:`~pyro_backpass.closed_form_td` returns an off-branch boundary value
    as the largest float below the threshold, so this plain rule is exact for its output.

    :param torch.Tensor td: top-down activation ``f_td``.
    :param threshold: λ, the activation threshold.
    :param background: β, the background mean.
    :param scale_on: σ1, e.g. one per channel, shaped ``(C, 1, 1)`` to broadcast.
    :param scale_off: σ2.

    Reference: Wang et al. 2016, eq. (9) and the supplement.
    """

    arg_constraints = {
        "td": constraints.real,
        "threshold": constraints.real,
        "background": constraints.real,
        "scale_on": constraints.positive,
        "scale_off": constraints.positive,
    }
    support = constraints.real
    has_rsample = False

    def __init__(
        self,
        td: torch.Tensor,
        *,
        threshold: torch.Tensor | float,
        background: torch.Tensor | float,
        scale_on: torch.Tensor | float,
        scale_off: torch.Tensor | float,
        validate_args: bool | None = None,
    ) -> None:
        self.td, self.threshold, self.background, self.scale_on, self.scale_off = broadcast_all(
            td, threshold, background, scale_on, scale_off
        )
        super().__init__(self.td.shape, torch.Size(), validate_args=validate_args)

    @property
    def on(self) -> torch.Tensor:
        """Where the object's own activation explains the scene (``f_td >= threshold``)."""
        return self.td >= self.threshold

    @property
    def mean(self) -> torch.Tensor:
        return torch.where(self.on, self.td, self.background)

    @property
    def stddev(self) -> torch.Tensor:
        return torch.where(self.on, self.scale_on, self.scale_off)

    @property
    def variance(self) -> torch.Tensor:
        return self.stddev.pow(2)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ThresholdedGaussian, _instance)
        batch_shape = torch.Size(batch_shape)
        for name in ("td", "threshold", "background", "scale_on", "scale_off"):
            setattr(new, name, getattr(self, name).expand(batch_shape))
        super(ThresholdedGaussian, new).__init__(batch_shape, torch.Size(), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        loc, scale = self.mean, self.stddev
        return -0.5 * ((value - loc) / scale).pow(2) - scale.log() - HALF_LOG_2PI

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            loc, scale = self.mean.expand(shape), self.stddev.expand(shape)
            return torch.normal(loc, scale)
