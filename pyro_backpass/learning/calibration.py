"""Calibrating σ0 of the upper levels for cluttered scenes (issue #10, lever "fit for the
decision it serves").

Hard EM fits σ0 of each level as the RMS residual of F_td around φ on single objects. In a
cluttered scene that is too loose on the upper levels: F̂ drifts to the bottom-up evidence
wherever clutter is strong, and the clutter travels down the hierarchy into the mask. A tighter
σ0 there makes F̂ follow the model's own prediction and vetoes clutter, at some cost on single
objects. :func:`calibrate_scale_td` chooses one multiplier of σ0 for a set of levels on
**validation** scenes, by the oracle ladder's rung (b): the mean visible-mask IoU of the pass
with the top level clamped to each object's own E-step assignment (only the levels below the
top decide, which is what σ0 of those levels controls).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from tqdm import tqdm

from pyro_backpass.backbone import Backbone
from pyro_backpass.data import Instance, Scene
from pyro_backpass.inference import greedy_map
from pyro_backpass.learning.e_step import e_step_level
from pyro_backpass.learning.evaluation import mask_iou
from pyro_backpass.learning.targets import masked_activations
from pyro_backpass.model import GenerativeModel
from pyro_backpass.results import MapResult

__all__ = [
    "UPPER_LEVELS",
    "calibrate_scale_td",
    "own_top_assignment",
    "top_clamped_iou",
    "top_clamped_passes",
]

# The levels where the oracle ladder saw clutter enter (issue #10): pool4 … conv3_1.
UPPER_LEVELS: tuple[str, ...] = ("pool4", "conv4_1", "pool3", "conv3_1")


@torch.no_grad()
def own_top_assignment(
    gm: GenerativeModel, backbone: Backbone, inst: Instance
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top level's ``(γ, δ)`` (each ``(1,)``) of a scene's object from its own masked
    activations alone (the E-step, category given, the model's priors): the truth the oracle
    ladder clamps to."""
    top = gm.hidden_levels[-1]
    label = torch.tensor([gm.categories.index(inst.category)], device=gm.device)
    target = masked_activations(backbone, inst.image_alone[None], inst.amodal_mask[None])
    gamma, delta, _ = e_step_level(
        gm.steps[top], label, target[top].to(gm.device),
        log_prior_gamma=gm.priors[f"gamma_{top}"].log_probs()[label],
        log_prior_delta=gm.priors[f"delta_{top}"].log_probs(),
    )  # fmt: skip
    return gamma, delta


@torch.no_grad()
def top_clamped_passes(
    gm: GenerativeModel, backbone: Backbone, scenes: Sequence[Scene]
) -> Iterator[tuple[Instance, MapResult]]:
    """For every visible object of ``gm``'s categories in ``scenes``: the object and the
    backward pass on its scene with the category given and the top level clamped to the
    object's own E-step assignment (:func:`own_top_assignment`) — the oracle ladder's rung
    (b), where only the levels below the top decide."""
    top = gm.hidden_levels[-1]
    for scene in scenes:
        acts = backbone(scene.image[None])
        bu = {k: v for k, v in acts.items() if k in gm.hidden_levels}
        for inst in scene.instances:
            if inst.category not in gm.categories or not bool(inst.mask.any()):
                continue
            label = torch.tensor([gm.categories.index(inst.category)], device=gm.device)
            gamma, delta = own_top_assignment(gm, backbone, inst)
            clamp = {f"gamma_{top}": gamma, f"delta_{top}": delta}
            yield inst, greedy_map(gm, bu, category=label, clamp=clamp)


@torch.no_grad()
def top_clamped_iou(gm: GenerativeModel, backbone: Backbone, scenes: Sequence[Scene]) -> float:
    """Mean visible-mask IoU over the scenes' visible objects of ``gm``'s categories of the
    backward pass with the category given and the top level clamped to the object's own E-step
    assignment (:func:`top_clamped_passes`)."""
    ious = [float(mask_iou(result.mask.cpu(), inst.mask[None])[0])
            for inst, result in top_clamped_passes(gm, backbone, scenes)]  # fmt: skip
    if not ious:
        raise ValueError("the scenes hold no visible object of the model's categories")
    return sum(ious) / len(ious)


@torch.no_grad()
def calibrate_scale_td(
    gm: GenerativeModel,
    backbone: Backbone,
    scenes: Sequence[Scene],
    *,
    levels: Sequence[str] = UPPER_LEVELS,
    multipliers: Sequence[float] = (1.0, 0.5, 0.25, 0.1),
    progress: bool = True,
) -> dict[float, float]:
    """Multiply σ0 of ``levels`` by the multiplier with the best :func:`top_clamped_iou` on
    ``scenes`` (use validation scenes), in place; ties go to the first multiplier listed.

    :returns: multiplier → mean IoU, for every multiplier tried.
    """
    names = [n for n in levels if n in gm.hidden_levels]
    if not names:
        raise ValueError(f"none of the levels {list(levels)} is in the model {gm.hidden_levels}")
    if not multipliers or any(not (m > 0) for m in multipliers):
        raise ValueError(f"multipliers must be positive numbers, got {list(multipliers)}")
    scenes = list(scenes)
    base = {n: gm.steps[n].scale_td.clone() for n in names}
    scores: dict[float, float] = {}
    for m in tqdm(multipliers, desc="calibrate σ0", disable=not progress):
        for n in names:
            gm.steps[n].scale_td.copy_(base[n] * m)
        scores[float(m)] = top_clamped_iou(gm, backbone, scenes)
    best = max(scores, key=lambda m: (scores[m], -list(scores).index(m)))
    for n in names:
        gm.steps[n].scale_td.copy_(base[n] * best)
    return scores
