"""The compositionality penalty of Stone et al. (2017), "Teaching Compositionality to CNNs".

Weight-shared copies of the network see a scene and each of its objects rendered alone at the
same place. At each chosen level ``l`` the scene's activations inside an object's downsampled
mask ``w`` are pulled towards the object's own activations::

    relative:  P_l = Σ_o Σ w_o (F_l(scene_o) − F_l(object_o))² / Σ_o Σ w_o F_l(object_o)²
    absolute:  P_l = Σ_o Σ w_o (F_l(scene_o) − F_l(object_o))² / Σ_o Σ w_o C_l

``absolute`` is the mean squared error per masked unit, as in the paper; it can be lowered by
shrinking the activations, and a throwaway experiment of issue 3 saw exactly that at the low
levels (conv1 turned into an outline detector). ``relative`` divides by the object's own
activation energy, so it is invariant to the scale of a level. It has a trivial minimiser
too: activations that do not depend on the input. Only the classification losses stand
against it, and in short runs (``benchmarks/results/backbone_penalty_selection.json``)
penalising pool3–pool4 alone collapsed the classifier to chance, pool1–pool4 cost much
accuracy, while penalising every conv and pool level kept more accuracy and lowered the
change at every level (the default of ``train-backbone --compositional``).

The method is covered by US patent 11,216,727; this package offers it as an option
(``train-backbone --compositional``), never as a hidden default.

References:
    Stone, Wang, Lee, Xie, Yuille (2017). Teaching compositionality to CNNs. CVPR.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor

from pyro_backpass.backbone.activations import Activations, downsample_mask
from pyro_backpass.backbone.compositionality import masked_change

__all__ = ["PenaltyKind", "compositional_penalty"]

PenaltyKind = Literal["relative", "absolute"]


def compositional_penalty(
    scene_acts: Activations,
    alone_acts: Activations,
    masks: Tensor,
    scene_index: Tensor,
    *,
    levels: Sequence[str],
    kind: PenaltyKind = "relative",
) -> Tensor:
    """Mean over ``levels`` of the penalty ``P_l`` above (a scalar with gradients to both copies).

    :param scene_acts: activations of ``S`` scenes.
    :param alone_acts: activations of ``O`` objects, each rendered alone.
    :param masks: each object's visible mask in its scene, bool ``(O, H, W)``.
    :param scene_index: the scene of each object, long ``(O,)``.
    """
    if kind not in ("relative", "absolute"):
        raise ValueError(f"penalty kind must be 'relative' or 'absolute', got {kind!r}")
    if len(levels) == 0:
        raise ValueError("give at least one level to penalise")
    total = 0.0
    for name in levels:
        spec = alone_acts.spec(name)
        if spec.kind in ("image", "category"):
            raise ValueError(f"cannot penalise level {name!r}: only conv and pool levels learn")
        alone = alone_acts[name]  # (O, C, h, w)
        w = downsample_mask(masks, (spec.height, spec.width)).to(alone)  # (O, h, w)
        err, energy = masked_change(scene_acts[name][scene_index], alone, w)
        if kind == "relative":
            denom = energy.sum()
        else:
            denom = w.sum() * spec.channels
        total = total + err.sum() / denom.clamp_min(1e-8)
    return total / len(levels)
