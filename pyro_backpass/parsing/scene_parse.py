"""Result types of scene parsing: one :class:`ParsedInstance` per found object, in a
:class:`SceneParse`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pyro_backpass.results import Mode

__all__ = ["ParsedInstance", "STOP_REASONS", "SceneParse"]

#: Why a parse ended.
STOP_REASONS: dict[str, str] = {
    "below_threshold": "the best remaining hypothesis's stop statistic (StopCriterion: the "
    "fitted log-odds of a new object, or its log-likelihood ratio against background) was not "
    "above the threshold",
    "max_objects": "max_objects instances were found (the cap, not the criterion)",
    "no_hypothesis": "the query ruled out every hypothesis",
    "imagined": "an imagination query: the best instance is returned whatever its score",
    "step_limit": "the parser's hard limit on steps was reached",
}


@dataclass(frozen=True)
class ParsedInstance:
    """One object found by one step of the parse.

    :ivar category: its category name.
    :ivar mask: ``(H, W)`` bool in image space: its visible part (the amodal mask less the
        occluder and less the instances found before it).
    :ivar amodal_mask: ``(H, W)`` bool: the whole reconstructed object (completed where it is
        occluded), the on-elements of the mask level of its top-down activations.
    :ivar score: its stop statistic (:class:`~pyro_backpass.parsing.StopCriterion`): for the
        shipped model the fitted log-odds that it is a new object, for other models its
        log-likelihood ratio against background (``llr``); comparable across scales.
    :ivar reconstruction: ``(3, H, W)`` its image-level top-down activations in image space.
    :ivar modes: the step's top-k hypotheses ``(assignment, log_joint)``, best first (the
        paper's Fig. 5 bars) in the view where it was found.
    :ivar mode_scores: the modes' log-likelihood ratios against background.
    :ivar mode_masks: ``(k, H, W)`` bool: the modes' amodal masks in image space (mark the
        true objects' modes with them when ground truth is known), or None.
    :ivar log_joint: the objective at its assignment.
    :ivar assignment: site → index (``category``, ``gamma_<level>``, ``delta_<level>``).
    :ivar scale: the scan scale of its view; ``view``: the view's index in the scan.
    :ivar llr: its log-likelihood ratio against the all-background explanation of what was
        left of the scene at its step (the paper's statistic).
    :ivar stop_inputs: what its stop statistic read, as the parser read it: ``llr``,
        ``visible`` and ``amodal`` pixels (of the readout's mask, before any CRF refinement, in
        the model's input frame), ``step`` and, when the criterion weighs it,
        ``class_log_prob`` (:func:`~pyro_backpass.parsing.stop_features`' arguments; refit a
        criterion on them), or None.
    :ivar heads: with a :class:`~pyro_backpass.parsing.HeadChoice`, the heads its step chose
        among (``per_category`` per view and category; the chosen one first, then by choice
        score): dicts
        of what the choice read (``category``, ``llr``, ``visible``, ``amodal``,
        ``class_log_probs``: :func:`~pyro_backpass.parsing.head_features`' arguments, pixels
        in the model's input frame), its ``score``, and its ``mask`` (visible) and
        ``amodal_mask`` ``(H, W)`` bool in image space, before any CRF; refit a choice on them.
        None without a choice.
    """

    category: str
    mask: torch.Tensor
    amodal_mask: torch.Tensor
    score: float
    reconstruction: torch.Tensor
    modes: list[Mode]
    mode_scores: list[float]
    mode_masks: torch.Tensor | None
    log_joint: float
    assignment: dict[str, int]
    scale: float = 1.0
    view: int = 0
    llr: float = math.nan
    stop_inputs: dict[str, float] | None = None
    heads: list[dict] | None = None

    def __repr__(self) -> str:
        return (
            f"ParsedInstance(category={self.category!r}, score={self.score:.2f}, "
            f"pixels={int(self.mask.sum())}, scale={self.scale})"
        )


@dataclass(frozen=True)
class SceneParse:
    """A parsed scene: the instances in the order found and why the parse stopped.

    :ivar instances: list of :class:`ParsedInstance`.
    :ivar stop_reason: a key of :data:`STOP_REASONS`.
    :ivar image: ``(3, H, W)`` the input as parsed.
    :ivar threshold: the stop criterion's threshold used.
    :ivar stop_score: the stop statistic of the best hypothesis the parse did not take (None
        if it stopped for another reason).
    :ivar beam: the number of parse paths kept.
    :ivar criterion: the stop statistic used (``StopCriterion.to_dict()``), or None.
    """

    instances: list[ParsedInstance]
    stop_reason: str
    image: torch.Tensor
    threshold: float
    stop_score: float | None = None
    beam: int = 1
    scores: list[float] = field(default_factory=list)
    criterion: dict | None = None

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the input image."""
        return int(self.image.shape[-2]), int(self.image.shape[-1])

    def __repr__(self) -> str:
        cats = [i.category for i in self.instances]
        return f"SceneParse({len(cats)} instances {cats}, stop_reason={self.stop_reason!r})"
