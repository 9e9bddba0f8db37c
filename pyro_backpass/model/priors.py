"""Priors over the discrete hidden variables: conditional categorical tables a user can swap.

Every discrete site of the model (``category``, ``gamma_<level>``, ``delta_<level>``) has a
prior: a conditional probability table over its values given the values of its *parents*,
sites higher in the hierarchy. The paper's layer-wise "n-gram model" (eq. 7) is an
:class:`NGramPrior`: ``P(γ_l | γ_{l+1}, …, γ_{l+n})`` with a Dirichlet prior on each row; the
offsets get a :class:`UniformPrior` (eq. 7) and a location preference is a
:class:`CategoricalPrior`. Inference code only ever calls :meth:`SitePrior.log_probs`, so a new
prior needs no change to inference: pass it on the model (``gm.priors[site] = ...``) or per call
(``greedy_map(..., priors={site: ...})``).

Reference: Wang et al. 2016, eq. (7); Brown et al. 1992 for n-gram models.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

__all__ = ["CategoricalPrior", "NGramPrior", "SitePrior", "UniformPrior"]


class SitePrior(nn.Module):
    """Base class: ``P(site | parents)`` as a table shaped ``(*parent_cardinalities, size)``.

    Subclasses set :attr:`parents` (site names, nearest first) and implement :meth:`log_probs`.
    Tables are buffers, so they follow ``.to(device)`` and are saved with the model.
    """

    parents: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return int(self.log_probs().shape[-1])

    def log_probs(self) -> torch.Tensor:
        """Normalised log-probabilities, shaped ``(*parent_cardinalities, size)``."""
        raise NotImplementedError

    def table(self, *, sample: bool = False, name: str = "table") -> torch.Tensor:
        """The probability table used by ``model()``; ``sample=True`` draws it from its prior."""
        return self.log_probs().exp()


def _check_table(probs: torch.Tensor, what: str) -> torch.Tensor:
    probs = torch.as_tensor(probs, dtype=torch.get_default_dtype())
    if probs.dim() == 0 or probs.shape[-1] == 0:
        raise ValueError(f"{what}: the table needs a last dimension of size >= 1")
    if not torch.isfinite(probs).all() or (probs < 0).any():
        raise ValueError(f"{what}: table entries must be finite and non-negative")
    sums = probs.sum(-1)
    if (sums <= 0).any():
        raise ValueError(f"{what}: every row needs a positive entry")
    return probs / sums.unsqueeze(-1)


class CategoricalPrior(SitePrior):
    """A fixed categorical over a site's values with no parents (e.g. a location preference).

    :param probs: ``(size,)`` non-negative weights (normalised here).
    """

    def __init__(self, probs: torch.Tensor | Sequence[float]) -> None:
        super().__init__()
        probs = _check_table(torch.as_tensor(probs), "CategoricalPrior")
        if probs.dim() != 1:
            raise ValueError(f"CategoricalPrior takes a 1-D table, got shape {tuple(probs.shape)}")
        self.register_buffer("probs", probs)

    def log_probs(self) -> torch.Tensor:
        return self.probs.log()


class UniformPrior(CategoricalPrior):
    """The uniform distribution over ``size`` values (the paper's ``P(δ)``)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"UniformPrior needs size >= 1, got {size}")
        super().__init__(torch.ones(size))


class NGramPrior(SitePrior):
    r"""A conditional multinomial table with a symmetric Dirichlet prior on each row::

        θ_{prefix} ~ Dirichlet(α · 1),      γ_l | prefix ~ Categorical(θ_{prefix})

    where the prefix is the values of ``parents`` (the n nearest upper levels' γ, the category
    counting as the γ of the top level). In ``model()`` the table is a point estimate (so MAP is
    deterministic); :meth:`table` with ``sample=True`` draws it from the Dirichlet for
    prior-predictive use, and :meth:`map_estimate` is the M-step of hard EM.

    :param probs: ``(*parent_cardinalities, size)`` table; rows are normalised here.
    :param parents: site names of the prefix, one per leading dimension of ``probs``.
    :param concentration: α > 0 of the symmetric Dirichlet.
    """

    def __init__(
        self, probs: torch.Tensor, *, parents: Sequence[str], concentration: float = 1.0
    ) -> None:
        super().__init__()
        probs = _check_table(probs, "NGramPrior")
        self.parents = tuple(parents)
        if probs.dim() != len(self.parents) + 1:
            raise ValueError(
                f"NGramPrior: table shape {tuple(probs.shape)} needs one leading dimension per "
                f"parent {self.parents} plus one for the values"
            )
        if not concentration > 0:
            raise ValueError(f"NGramPrior: concentration must be > 0, got {concentration}")
        self.concentration = float(concentration)
        self.register_buffer("probs", probs)

    @classmethod
    def uniform(
        cls, parent_sizes: Sequence[int], size: int, *, parents: Sequence[str], **kwargs
    ) -> NGramPrior:
        return cls(torch.ones(*parent_sizes, size), parents=parents, **kwargs)

    def log_probs(self) -> torch.Tensor:
        return self.probs.log()

    def table(self, *, sample: bool = False, name: str = "table") -> torch.Tensor:
        if not sample:
            return self.probs
        alpha = self.probs.new_full(self.probs.shape, self.concentration)
        # One Dirichlet per prefix row; the rows are the event dims beyond the last.
        return pyro.sample(name, dist.Dirichlet(alpha).to_event(alpha.dim() - 1))

    def map_estimate(self, counts: torch.Tensor) -> torch.Tensor:
        """Posterior mode of each row given counts: ``(n + α − 1) / Σ (n + α − 1)``.

        With α < 1 the mode can sit on the simplex's boundary; entries are clipped at 0 and a
        row with no positive entry falls back to uniform.
        """
        counts = torch.as_tensor(counts, dtype=self.probs.dtype, device=self.probs.device)
        if counts.shape != self.probs.shape:
            raise ValueError(
                f"counts shape {tuple(counts.shape)} != table shape {tuple(self.probs.shape)}"
            )
        mode = (counts + self.concentration - 1).clamp(min=0)
        empty = mode.sum(-1, keepdim=True) <= 0
        mode = torch.where(empty, torch.ones_like(mode), mode)
        return mode / mode.sum(-1, keepdim=True)
