"""Figures: each function takes data or results, draws on ``ax=None`` (a new figure) and returns
``(fig, ax)``; nothing here runs a model or calls ``plt.show()``.
"""

from pyro_backpass.viz.parse_plots import plot_instances, plot_mode_bars, plot_overlay
from pyro_backpass.viz.plotting import (
    plot_distractor_sweep,
    plot_modes,
    plot_reconstruction,
    plot_samples,
)

__all__ = [
    "plot_distractor_sweep",
    "plot_instances",
    "plot_mode_bars",
    "plot_modes",
    "plot_overlay",
    "plot_reconstruction",
    "plot_samples",
]
