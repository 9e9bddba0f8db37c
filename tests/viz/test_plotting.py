import matplotlib.pyplot as plt
import pytest
import torch

from pyro_backpass import GenerativeModel, greedy_map, sample
from pyro_backpass.viz.plotting import plot_modes, plot_reconstruction, plot_samples, to_rgb


def test_plots_return_fig_and_axes():
    gm = GenerativeModel.random([3, "M"], num_components=2, num_categories=2, image_size=8)
    s = sample(gm, 3, observe=True, seed=0)
    r = greedy_map(gm, s.bu, top_k=4)
    fig, axes = plot_samples(s, titles=["a", "b", "c"])
    assert axes.size >= 3
    fig, axes = plot_reconstruction(s.bu["image"], r, index=1)
    assert len(axes) == 3
    fig, ax = plot_modes(r, highlight=[0], label_sites=["delta_pool1"])
    assert len(ax.patches) == 4
    assert ax.patches[0].get_facecolor() != ax.patches[1].get_facecolor()
    _, existing = plt.subplots()
    assert plot_modes(r, ax=existing)[1] is existing
    plt.close("all")
    with pytest.raises(ValueError, match="top_k"):
        plot_modes(greedy_map(gm, s.bu))


def test_to_rgb_clips_or_normalises():
    x = torch.tensor([-1.0, 0.5, 2.0]).reshape(3, 1, 1)
    assert to_rgb(x).flatten().tolist() == [0.0, 0.5, 1.0]
    assert to_rgb(x, normalize=True).flatten().tolist() == [0.0, 0.5, 1.0]
    assert to_rgb(torch.rand(5, 4, 4)).shape == (4, 4, 3)
