"""Figures of scene parses: the instances found in turn, the posterior-mode bars of each step
(paper Fig. 5) and mask overlays. Inputs are plain tensors and strings (this module knows
nothing of models); every function takes ``ax``/``axes=None`` and returns ``(fig, ax)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from pyro_backpass.viz.plotting import to_rgb

__all__ = ["plot_instances", "plot_mode_bars", "plot_overlay"]


def plot_overlay(
    image: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    title: str = "",
    outline: torch.Tensor | None = None,
    ax=None,
):
    """``image`` ``(3, H, W)`` with ``mask`` ``(H, W)`` filled in and ``outline`` (e.g. an
    amodal mask) drawn as a contour."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(2.6, 2.6))
    else:
        fig = ax.figure
    ax.imshow(to_rgb(image), interpolation="nearest")
    if mask is not None:
        m = mask.detach().cpu().numpy().astype(bool)
        ax.imshow(np.ma.masked_where(~m, m.astype(float)), alpha=0.55, cmap="autumn",
                  vmin=0, vmax=1, interpolation="nearest")  # fmt: skip
    if outline is not None and outline.any():
        ax.contour(outline.detach().cpu().numpy().astype(float), levels=[0.5], colors="cyan",
                   linewidths=1.0)  # fmt: skip
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    return fig, ax


def plot_instances(
    image: torch.Tensor,
    reconstructions: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    titles: Sequence[str],
    *,
    suptitle: str = "",
    axes=None,
):
    """The input, then per instance (in the order found) its reconstruction (top row) and its
    visible mask over the input (bottom row)."""
    n = len(masks)
    if axes is None:
        fig, axes = plt.subplots(2, n + 1, figsize=(2.1 * (n + 1), 4.4), squeeze=False)
    else:
        fig = axes.flat[0].figure
    axes[0, 0].imshow(to_rgb(image), interpolation="nearest")
    axes[0, 0].set_title("input", fontsize=8)
    for ax in axes[:, 0]:
        ax.axis("off")
    for i in range(n):
        axes[0, i + 1].imshow(to_rgb(reconstructions[i], normalize=True), interpolation="nearest")
        axes[0, i + 1].set_title(f"step {i + 1}: {titles[i]}", fontsize=7)
        axes[0, i + 1].axis("off")
        plot_overlay(image, masks[i], title="visible mask", ax=axes[1, i + 1])
    if n == 0:
        axes[1, 0].text(0.5, 0.5, "no instance", ha="center", va="center", fontsize=8)
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    return fig, axes


def plot_mode_bars(
    values: Sequence[float],
    labels: Sequence[str],
    *,
    highlight: Sequence[int] = (),
    title: str = "",
    ylabel: str = "log-likelihood ratio vs background",
    ax=None,
):
    """Bars of one step's top-k hypotheses, best first, labelled in words; ``highlight``:
    positions drawn in red (the true objects' modes, the paper's red bars)."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(4.0, 0.42 * len(values) + 1.5), 3.2))
    else:
        fig = ax.figure
    marks = set(highlight)
    colours = ["tab:red" if i in marks else "tab:blue" for i in range(len(values))]
    ax.bar(range(len(values)), values, color=colours)
    if values:
        lo, hi = min(values), max(values)
        pad = 0.08 * (hi - lo + 1)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(labels, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    return fig, ax
