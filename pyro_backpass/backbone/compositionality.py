"""Feature compositionality: how much an object's activations change when others join it.

The paper's supplement (Fig. 7–8) moves a distractor across a plane and watches VGG's
activations of the plane change long before the two touch. The generative model relates the
activations of an object rendered alone (top-down, ``F_td``) to those of the scene
(bottom-up, ``F_bu``); the less they differ inside the object's mask, the less the noise scale
``σ1`` of the observation model has to absorb. Two tools:

* :func:`distractor_sweep` / :func:`plot_distractor_sweep` — the supplement's study: per level,
  the relative change of the object's activations inside its (downsampled) mask, per frame::

      change_l(t) = sqrt( Σ w_l · (F_l(frame_t) − F_l(object))² / Σ w_l · F_l(object)² )

  where ``w_l`` is the fraction of each level cell the object's mask covers.
* :func:`compositionality_score` — one number per level over many cluttered scenes: the same
  relative change between each object in its scene and the object rendered alone at the same
  place, pooled over objects (ratio of sums, so small, faint objects do not dominate). Lower
  is more compositional; 0 at the ``image`` level up to antialiased mask edges.

References:
    Wang, Zhang, Xie, Yuille (2016). A backward pass through a CNN using a generative model
    of its activations. arXiv:1611.02767 (supplement, "Feature compositionality").
    Stone, Wang, Lee, Xie, Yuille (2017). Teaching compositionality to CNNs. CVPR.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pyro_backpass.backbone.activations import Activations, downsample_mask
from pyro_backpass.backbone.backbone import Backbone
from pyro_backpass.results import DistractorSweep

__all__ = [
    "CompositionalityScore",
    "DistractorSweep",
    "compositionality_score",
    "distractor_sweep",
    "masked_change",
]


def masked_change(scene: Tensor, alone: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Masked squared change and masked energy per object.

    :param scene: activations of each object's scene, ``(O, C, h, w)``.
    :param alone: activations of each object alone, ``(O, C, h, w)``.
    :param weight: mask fraction per cell, ``(O, h, w)``.
    :returns: ``(Σ w (scene − alone)², Σ w alone²)``, each ``(O,)``.
    """
    w = weight.unsqueeze(1)  # (O, 1, h, w)
    err = (w * (scene - alone).square()).sum(dim=(1, 2, 3))
    energy = (w * alone.square()).sum(dim=(1, 2, 3))
    return err, energy


@dataclass(frozen=True)
class CompositionalityScore:
    """Per-level relative change of objects' activations in clutter (lower: more compositional).

    ``relative_change[level] = sqrt(Σ_o err_o / Σ_o energy_o)`` over ``n_objects`` objects.
    """

    relative_change: dict[str, float]
    n_objects: int

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.3f}" for k, v in self.relative_change.items())


@torch.no_grad()
def compositionality_score(
    backbone: Backbone,
    scenes: Tensor,
    objects: Tensor,
    masks: Tensor,
    scene_index: Tensor,
    *,
    batch_size: int = 64,
) -> CompositionalityScore:
    """Relative change of each object's activations between its scene and itself alone.

    :param scenes: scene images ``(S, 3, H, W)`` in ``[0, 1]``.
    :param objects: each object rendered alone at its place in the scene, ``(O, 3, H, W)``.
    :param masks: each object's visible mask in its scene, bool ``(O, H, W)``.
    :param scene_index: the scene of each object, long ``(O,)`` into ``scenes``.
    """
    n = objects.shape[0]
    if not (masks.shape[0] == scene_index.shape[0] == n) or masks.shape[-2:] != objects.shape[-2:]:
        raise ValueError(
            f"objects {tuple(objects.shape)}, masks {tuple(masks.shape)} and scene_index "
            f"{tuple(scene_index.shape)} must agree on the number of objects and image size"
        )
    err: dict[str, Tensor] = {}
    energy: dict[str, Tensor] = {}
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        a_scene = backbone(scenes[scene_index[sl]])
        a_alone = backbone(objects[sl])
        for name in a_alone:
            spec = a_alone.spec(name)
            w = downsample_mask(masks[sl], (spec.height, spec.width)).to(a_alone[name])
            e, en = masked_change(a_scene[name], a_alone[name], w)
            err[name] = err.get(name, 0) + e.sum()
            energy[name] = energy.get(name, 0) + en.sum()
    change = {k: float((err[k] / energy[k].clamp_min(1e-12)).sqrt()) for k in err}
    return CompositionalityScore(relative_change=change, n_objects=n)


def _shift(x: Tensor, dx: int, *, dim: int = -1) -> Tensor:
    """Shift along ``dim`` by ``dx`` pixels, filling with zeros (no wrap-around)."""
    out = torch.zeros_like(x)
    n = x.shape[dim]
    if abs(dx) < n:
        src = x.narrow(dim, max(-dx, 0), n - abs(dx))
        out.narrow(dim, max(dx, 0), n - abs(dx)).copy_(src)
    return out


@torch.no_grad()
def distractor_sweep(
    backbone: Backbone,
    object_image: Tensor,
    object_mask: Tensor,
    distractor_image: Tensor,
    distractor_mask: Tensor,
    *,
    step: int = 2,
    levels: Sequence[str] | None = None,
) -> DistractorSweep:
    """Move a distractor horizontally from outside the frame until it covers the object.

    The supplement's sequence (Fig. 7–8), on any backbone: the distractor (pasted over the
    object image where its mask is set) is first moved to the object's row (centres aligned),
    then starts just left of the frame and moves ``step`` pixels per frame until its centre
    reaches the object's centre.

    :param object_image: ``(3, H, W)`` in ``[0, 1]``; ``object_mask``: bool ``(H, W)``.
    :param distractor_image: ``(3, H, W)``; ``distractor_mask``: bool ``(H, W)``.
    """
    if object_image.shape != distractor_image.shape or object_image.dim() != 3:
        raise ValueError(
            f"object and distractor images must both be (3, H, W), got "
            f"{tuple(object_image.shape)} and {tuple(distractor_image.shape)}"
        )
    H, W = object_image.shape[-2:]
    for m, what in ((object_mask, "object_mask"), (distractor_mask, "distractor_mask")):
        if m.shape != (H, W) or m.dtype != torch.bool:
            raise ValueError(f"{what} must be bool ({H}, {W}), got {m.dtype} {tuple(m.shape)}")
        if not m.any():
            raise ValueError(f"{what} is empty")
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    # Align the rows of the two centres so that the distractor passes over the object.
    rows_o, rows_d = object_mask.any(1).nonzero(), distractor_mask.any(1).nonzero()
    dy = round(float(rows_o.float().mean()) - float(rows_d.float().mean()))
    distractor_image = _shift(distractor_image, dy, dim=-2)
    distractor_mask = _shift(distractor_mask, dy, dim=-2)
    cols_o = object_mask.any(0).nonzero().flatten()
    cols_d = distractor_mask.any(0).nonzero().flatten()
    o_left, o_centre = int(cols_o.min()), float(cols_o.float().mean())
    d_right, d_centre = int(cols_d.max()), float(cols_d.float().mean())
    first, last = -d_right - 1, round(o_centre - d_centre)
    shifts = torch.arange(first, max(last, first) + 1, step)
    frames, occluded = [], []
    for dx in shifts.tolist():
        dm = _shift(distractor_mask, dx)
        frames.append(torch.where(dm, _shift(distractor_image, dx), object_image))
        occluded.append((dm & object_mask).sum() / object_mask.sum())
    frames_t = torch.stack(frames)  # (T, 3, H, W)
    clean = backbone(object_image.unsqueeze(0))
    names = list(levels) if levels is not None else list(clean)
    change: dict[str, list[Tensor]] = {k: [] for k in names}
    for start in range(0, len(frames_t), 32):
        acts: Activations = backbone(frames_t[start : start + 32])
        for name in names:
            spec = acts.spec(name)
            w = downsample_mask(object_mask.unsqueeze(0), (spec.height, spec.width))
            w = w.to(acts[name]).expand(acts[name].shape[0], -1, -1)
            ref = clean[name].expand_as(acts[name])
            e, en = masked_change(acts[name], ref, w)
            change[name].append((e / en.clamp_min(1e-12)).sqrt())
    return DistractorSweep(
        shifts=shifts,
        gap=o_left - (d_right + shifts) - 1,
        frames=frames_t,
        change={k: torch.cat(v) for k, v in change.items()},
        occluded=torch.stack(occluded),
    )
