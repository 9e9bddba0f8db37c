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

    The pass runs with ``gm``'s own priors: on a model that already holds learned δ priors the
    counts follow them (assign uniform ones back first for a fit from scratch).

    :param images: ``(N, 3, H, W)`` objects in [0, 1], e.g. lone training objects; N ≥ 1.
    :param labels: ``(N,)`` their categories: indices, or names of ``gm.categories``.
    :param levels: hidden levels to fit (default: every hidden level with more than one offset).
    :param concentration: α ≥ 1; 2 adds one to every count; 1 gives the counts' frequencies, so
        an offset never picked becomes impossible (probability 0) in ``sample`` and the pass.
    :param batch_size: objects per backward pass.
    :returns: ``{"delta_<level>": CategoricalPrior}`` for the ``priors=`` of ``sample`` and
        ``greedy_map`` (each ``(D,)``, on the model's device and dtype).
    """
    if gm.backbone is None:
        raise ValueError("fit_offset_priors needs the model's backbone (gm.backbone is None)")
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (N, 3, H, W) tensor, got {shape}")
    if images.shape[0] == 0:
        raise ValueError("fit_offset_priors needs at least one image, got none")
    labels = _label_indices(gm, labels)
    if labels.shape != images.shape[:1]:
        raise ValueError(
            f"labels must be (N,) with N = {images.shape[0]} (one per image), "
            f"got {tuple(labels.shape)}"
        )
    if not torch.isfinite(images).all():
        raise ValueError("images hold NaN or infinite values")
    if not concentration >= 1.0:
        raise ValueError(f"concentration must be >= 1 (a mode), got {concentration}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(levels, str):
        raise ValueError(f"levels must be a list of level names, got the string {levels!r}")
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
        out[f"delta_{n}"] = CategoricalPrior(mode / mode.sum()).to(device=gm.device, dtype=gm.dtype)
    return out


def _label_indices(gm: GenerativeModel, labels) -> torch.Tensor:
    """``(N,)`` long category indices from indices or names, with errors that name ``labels``."""
    if isinstance(labels, (list, tuple)) and labels and all(isinstance(x, str) for x in labels):
        unknown = sorted({x for x in labels if x not in gm.categories})
        if unknown:
            raise ValueError(f"labels name unknown categories {unknown}; the model's are "
                             f"{list(gm.categories)}")  # fmt: skip
        return torch.tensor([gm.categories.index(x) for x in labels])
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError) as err:
        raise ValueError(f"labels must be category indices or names, got {labels!r}") from err
    if labels.dtype in (torch.bool,) or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integer category indices, got dtype {labels.dtype}")
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < len(gm.categories)):
        raise ValueError(
            f"labels must lie in [0, {len(gm.categories)}) (the model's categories), got "
            f"{int(labels.min())}..{int(labels.max())}"
        )
    return labels.long().cpu()
