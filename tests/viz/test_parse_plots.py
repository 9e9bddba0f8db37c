"""Figures of parses: (fig, ax) out, given axes used, red bars where asked."""

import matplotlib.pyplot as plt
import torch
from matplotlib.colors import to_rgba

from pyro_backpass import plot_instances, plot_mode_bars, plot_overlay


def test_mode_bars_are_labelled_in_words_and_marked():
    fig, ax = plot_mode_bars([5.0, 3.0, -1.0], ["airplane γ=2 δ=(−1,0)", "car γ=0 δ=(0,0)", "x"],
                             highlight=[1], title="step 1")  # fmt: skip
    colours = [p.get_facecolor() for p in ax.patches]
    assert colours[1] == to_rgba("tab:red") and colours[0] == to_rgba("tab:blue")
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "airplane γ=2 δ=(−1,0)"
    plt.close(fig)


def test_instances_and_overlay_draw_on_given_axes():
    image = torch.rand(3, 16, 16)
    masks = [torch.rand(16, 16) > 0.5 for _ in range(2)]
    fig, axes = plot_instances(image, [torch.randn(3, 16, 16)] * 2, masks, ["a", "b"])
    assert axes.shape == (2, 3)
    plt.close(fig)
    fig, ax = plt.subplots()
    out_fig, out_ax = plot_overlay(image, masks[0], outline=masks[1], title="t", ax=ax)
    assert out_ax is ax and out_fig is fig and ax.get_title() == "t"
    plt.close(fig)
    fig, axes = plot_instances(image, [], [], [])  # an empty parse still draws
    plt.close(fig)
