"""Captum baselines for the parsing benchmark: saliency maps on the same backbone, turned into
instances by a threshold and connected components.

Each method is one of Captum's gradient attributions of a class logit with respect to the
input: ``GuidedBackprop`` (Springenberg et al. 2015), ``Deconvolution`` (Zeiler and Fergus
2014) and ``GuidedGradCam`` (Selvaraju et al. 2017, on the last conv layer). Captum needs the
network as an ``nn.Module`` that maps images to logits with ReLUs as modules it can hook, so
:class:`LogitModel` copies the backbone's layers with out-of-place ReLUs and puts the input
normalisation inside ``forward`` (``Backbone.forward`` returns ``Activations``, not logits).

A saliency map is ``|attribution|`` summed over RGB, ``(H, W)``. Instances of a scene: the
maps of every known category, each divided by its maximum, the pixel-wise maximum over
categories smoothed by a Gaussian of width ``sigma``, thresholded at ``threshold`` and split
into 8-connected components (``scipy.ndimage.label``) of at least ``min_area`` pixels; a
component's category is the one with the most saliency in it and its score its summed
normalised saliency. ``(sigma, threshold, min_area)`` are tuned on validation scenes by
:func:`tune`.

Requires Captum: ``pip install -e ".[baselines]"`` (``dev`` includes it).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from pyro_backpass import Backbone, InstanceEvaluation, PredictedInstances

METHODS: tuple[str, ...] = ("guided_backprop", "deconvolution", "guided_gradcam")

# Tuning grid (validation split): smoothing width (px), threshold (fraction of the map's
# maximum) and the smallest component kept (px).
SIGMAS: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0)
THRESHOLDS: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
MIN_AREAS: tuple[int, ...] = (0, 16, 32, 64, 128, 256)


class LogitModel(nn.Module):
    """Images ``(B, 3, H, W)`` in [0, 1] → logits ``(B, K)`` of a copy of ``backbone``, with
    out-of-place ReLUs (Captum's guided backprop and deconvolution hook ReLU modules, and an
    in-place ReLU would overwrite the tensors they need)."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        if backbone.head is None:
            raise ValueError("the baselines need a backbone with a classifier head")
        self.features = copy.deepcopy(backbone.features)
        for m in self.features.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False
        self.head = copy.deepcopy(backbone.head)
        self.register_buffer("mean", backbone.mean.clone())
        self.register_buffer("std", backbone.std.clone())
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((images - self.mean) / self.std))

    @property
    def last_conv(self) -> nn.Conv2d:
        return [m for m in self.features if isinstance(m, nn.Conv2d)][-1]


def attribution_fn(method: str, backbone: Backbone) -> Callable[[torch.Tensor, int], np.ndarray]:
    """``fn(image (3, H, W), target) -> (H, W)`` saliency ``|attribution|`` summed over RGB."""
    from captum.attr import Deconvolution, GuidedBackprop, GuidedGradCam

    model = LogitModel(backbone)
    if method == "guided_backprop":
        algo = GuidedBackprop(model)
    elif method == "deconvolution":
        algo = Deconvolution(model)
    elif method == "guided_gradcam":
        algo = GuidedGradCam(model, model.last_conv)
    else:
        raise ValueError(f"unknown baseline {method!r}; known: {list(METHODS)}")

    def fn(image: torch.Tensor, target: int) -> np.ndarray:
        x = image[None].clone().requires_grad_(True)  # (1, 3, H, W)
        with warnings.catch_warnings():
            # Captum announces on every call that it hooks the ReLUs (that is the method).
            warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
            attr = algo.attribute(x, target=int(target))  # (1, 3, H, W)
        return attr.detach()[0].abs().sum(0).cpu().numpy()  # (H, W)

    return fn


def category_maps(
    fn: Callable[[torch.Tensor, int], np.ndarray], image: torch.Tensor, n_categories: int
) -> np.ndarray:
    """``(N, H, W)``: the saliency map of every category."""
    return np.stack([fn(image, c) for c in range(n_categories)])


@dataclass(frozen=True)
class Setting:
    """Post-processing of a saliency map into instances (tuned on validation scenes)."""

    sigma: float
    threshold: float
    min_area: int


def instances_from_maps(
    maps: np.ndarray, categories: Sequence[str], setting: Setting
) -> PredictedInstances:
    """Instances from the per-category maps ``(N, H, W)`` of one scene."""
    norm = maps / np.maximum(maps.reshape(len(maps), -1).max(1), 1e-12)[:, None, None]
    combined = norm.max(0)  # (H, W)
    if setting.sigma > 0:
        combined = ndimage.gaussian_filter(combined, setting.sigma)
    peak = combined.max()
    if peak <= 0:
        return PredictedInstances.empty(combined.shape)
    labels, n = ndimage.label(combined >= setting.threshold * peak, structure=np.ones((3, 3)))
    masks, scores, cats = [], [], []
    for k in range(1, n + 1):
        m = labels == k
        if m.sum() < max(setting.min_area, 1):
            continue
        masks.append(m)
        scores.append(float(combined[m].sum()))
        cats.append(categories[int(norm[:, m].sum(1).argmax())])
    if not masks:
        return PredictedInstances.empty(combined.shape)
    return PredictedInstances(np.stack(masks), np.asarray(scores), tuple(cats))


def tune(
    maps: Sequence[np.ndarray],
    truths: Sequence[PredictedInstances],
    categories: Sequence[str],
    *,
    grid: tuple[Sequence[float], Sequence[float], Sequence[int]] = (SIGMAS, THRESHOLDS, MIN_AREAS),
) -> tuple[Setting, float]:
    """The setting of ``grid`` (sigmas, thresholds, smallest areas) with the best F1 of recall
    and precision at IoU ≥ 0.5 on the given (validation) scenes, ties to the higher mean
    matched IoU; returns it and its F1."""
    best, best_key = None, (-1.0, -1.0)
    for sigma, thr, area in itertools.product(*grid):
        s = Setting(sigma, thr, area)
        ev = InstanceEvaluation(categories)
        for m, t in zip(maps, truths, strict=True):
            ev.add(instances_from_maps(m, categories, s), t)
        r = ev.hits / ev.n_true if ev.n_true else 0.0
        p = ev.hits / ev.n_pred if ev.n_pred else 0.0
        f1 = 2 * r * p / (r + p) if r + p > 0 else 0.0
        key = (f1, float(np.mean(ev.partner_ious)) if ev.partner_ious else 0.0)
        if key > best_key:
            best, best_key = s, key
    assert best is not None
    return best, best_key[0]
