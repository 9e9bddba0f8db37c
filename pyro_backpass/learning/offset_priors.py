"""Priors on the offsets δ learned from objects (issue #10's samples target).

The paper's P(δ) is uniform. Fitted to lone objects, the model's own backward pass picks some
offsets far more often than others (the object centred at every level), and drawing δ
uniformly puts sampled objects where the training objects never were — partly outside the
frame at the top level. :func:`fit_offset_priors` turns the offsets the pass picks into
categorical priors, to pass per call (``sample(gm, n, priors=...)``, ``greedy_map(...,
priors=...)``) or to assign into ``gm.priors``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pyro_backpass.inference import greedy_map
from pyro_backpass.model import CategoricalPrior, GenerativeModel

__all__ = ["fit_offset_priors"]


@torch.no_grad()
def fit_offset_priors(
    gm: GenerativeModel,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    levels: Sequence[str] | None = None,
    concentration: float = 2.0,
    batch_size: int = 64,
) -> dict[str, CategoricalPrior]:
    """Per level, the Dirichlet posterior mode (symmetric α = ``concentration``) of the offsets
    that the backward pass (``greedy_map``, category given) picks on ``images``.

    :param images: ``(N, 3, H, W)`` objects in [0, 1], e.g. lone training objects.
    :param labels: ``(N,)`` their category indices.
    :param levels: hidden levels to fit (default: every hidden level with more than one offset).
    :param concentration: α ≥ 1; 2 adds one to every count.
    :returns: ``{"delta_<level>": CategoricalPrior}`` for the ``priors=`` of ``sample`` and
        ``greedy_map`` (each ``(D,)``, on the model's device and dtype).
    """
    if gm.backbone is None:
        raise ValueError("fit_offset_priors needs the model's backbone (gm.backbone is None)")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
    labels = torch.as_tensor(labels)
    if labels.shape != images.shape[:1] or images.shape[0] == 0:
        raise ValueError(
            f"labels must be (N,) with N = {images.shape[0]} >= 1, got {tuple(labels.shape)}"
        )
    if not torch.isfinite(images).all():
        raise ValueError("images hold NaN or infinite values")
    if not concentration >= 1.0:
        raise ValueError(f"concentration must be >= 1 (a mode), got {concentration}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if levels is None:
        names = [n for n in gm.hidden_levels if gm.steps[n].num_offsets > 1]
    else:
        names = list(levels)
        unknown = [n for n in names if n not in gm.hidden_levels]
        if unknown:
            raise ValueError(f"unknown levels {unknown}; the model's are {list(gm.hidden_levels)}")
    counts = {n: torch.zeros(gm.steps[n].num_offsets, dtype=torch.float64) for n in names}
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start : start + batch_size].to(device=gm.device, dtype=gm.dtype)
        acts = gm.backbone(chunk)
        bu = {k: v for k, v in acts.items() if k in gm.hidden_levels}
        picked = greedy_map(gm, bu, category=labels[start : start + batch_size]).assignment
        for n in names:
            counts[n] += torch.bincount(picked[f"delta_{n}"].cpu(), minlength=counts[n].numel())
    out = {}
    for n, c in counts.items():
        mode = c + (concentration - 1.0)
        if not mode.sum() > 0:  # α = 1 and nothing counted cannot happen (N >= 1); kept safe
            mode = torch.ones_like(mode)
        probs = (mode / mode.sum()).to(device=gm.device, dtype=gm.dtype)
        out[f"delta_{n}"] = CategoricalPrior(probs)
    return out
