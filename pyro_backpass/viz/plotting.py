"""Figures: samples, MAP reconstructions and the posterior-mode bars (paper Figs. 3–5).

Every function takes ``ax``/``axes=None`` and returns ``(fig, ax)``; none calls ``plt.show()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from pyro_backpass.results import DistractorSweep, MapResult, Sample

__all__ = [
    "plot_distractor_sweep",
    "plot_modes",
    "plot_reconstruction",
    "plot_samples",
    "to_rgb",
]


def to_rgb(x: torch.Tensor, *, normalize: bool = False) -> np.ndarray:
    """``(3, H, W)`` → ``(H, W, 3)`` array for ``imshow``: clipped to [0, 1], or min–max scaled.

    A model's image level is Gaussian, so its samples leave [0, 1]; ``normalize`` rescales.
    """
    x = x.detach().float().cpu()
    if x.shape[0] != 3:
        x = x.abs().amax(0, keepdim=True).expand(3, -1, -1)  # other levels: max over channels
        normalize = True
    if normalize:
        lo, hi = x.min(), x.max()
        x = (x - lo) / (hi - lo).clamp_min(1e-8)
    return x.clamp(0, 1).permute(1, 2, 0).numpy()


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 8)
    return math.ceil(n / cols), cols


def plot_samples(
    sample: Sample,
    *,
    level: str = "image",
    n: int | None = None,
    normalize: bool = True,
    titles: Sequence[str] | None = None,
    axes=None,
):
    """A grid of sampled top-down activations (the image level by default), Fig. 3–4."""
    x = sample.td[level]
    n = x.shape[0] if n is None else min(n, x.shape[0])
    rows, cols = _grid(n)
    if axes is None:
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    else:
        fig = axes.flat[0].figure
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(to_rgb(x[i], normalize=normalize), interpolation="nearest")
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
    return fig, axes


def plot_reconstruction(
    image: torch.Tensor, result: MapResult, *, index: int = 0, normalize: bool = False, axes=None
):
    """Input, the MAP reconstruction F̂^0_td, and the object mask over the input."""
    if axes is None:
        fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.7))
    else:
        fig = axes[0].figure
    panels = [
        (to_rgb(image[index], normalize=normalize), "input"),
        (to_rgb(result.td["image"][index], normalize=normalize), "MAP reconstruction"),
        (to_rgb(image[index], normalize=normalize), "object mask"),
    ]
    for ax, (img, title) in zip(axes, panels, strict=True):
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    mask = result.mask[index].detach().cpu().numpy()
    overlay = np.ma.masked_where(~mask, mask.astype(float))  # False stays transparent
    axes[2].imshow(overlay, alpha=0.5, cmap="autumn", vmin=0, vmax=1, interpolation="nearest")
    return fig, axes


def plot_modes(
    result: MapResult,
    *,
    index: int = 0,
    highlight: Sequence[int] = (),
    label_sites: Sequence[str] = (),
    ax=None,
):
    """Bars of the log-joint of the top-k hypotheses of one image, best first (Fig. 5).

    :param highlight: positions (in the mode list) drawn in red, e.g. the true objects.
    :param label_sites: sites whose values label each bar (e.g. ``["delta_pool5"]``).
    """
    if result.modes is None:
        raise ValueError("result has no modes: run greedy_map(..., top_k=k) with k > 1")
    modes = result.modes[index]
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(modes) + 1), 2.8))
    else:
        fig = ax.figure
    values = [lj for _, lj in modes]
    colors = ["tab:red" if i in set(highlight) else "tab:blue" for i in range(len(modes))]
    ax.bar(range(len(modes)), values, color=colors)
    lo = min(values)
    ax.set_ylim(lo - 0.05 * (max(values) - lo + 1), max(values) + 0.05 * (max(values) - lo + 1))
    ax.set_xlabel("hypothesis (best first)")
    ax.set_ylabel("log-joint")
    if label_sites:
        ax.set_xticks(range(len(modes)))
        ax.set_xticklabels(
            ["/".join(str(a[s]) for s in label_sites) for a, _ in modes], rotation=90, fontsize=7
        )
    return fig, ax


def plot_distractor_sweep(sweep: DistractorSweep, *, levels: Sequence[str] | None = None, ax=None):
    """Relative change per level against the distractor–object gap. Returns ``(fig, ax)``."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    else:
        fig = ax.figure
    names = [n for n in (levels or sweep.change) if n != "image"]
    cmap = plt.get_cmap("viridis")
    for i, name in enumerate(names):
        colour = cmap(i / max(len(names) - 1, 1))
        ax.plot(sweep.gap.numpy(), sweep.change[name].numpy(), color=colour, label=name, lw=1.2)
    ax.axvline(0, color="k", ls="--", lw=0.8)
    ax.invert_xaxis()  # the distractor approaches from the left: time runs left to right
    ax.set_xlabel("gap between distractor and object (px; < 0: overlapping)")
    ax.set_ylabel("relative change inside object mask")
    ax.legend(fontsize=6, ncol=2, frameon=False)
    return fig, ax
