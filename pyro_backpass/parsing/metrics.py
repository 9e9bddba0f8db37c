"""Instance-mask evaluation of scene parses: matching, recall/precision, COCO mask AP, counts,
foreground ARI, class sensitivity and occlusion completion.

A method's output on one scene is a list of predicted instances (bool masks, scores and
categories); the truth is the scene's instances of known categories. Predictions and truths
are matched one-to-one by the Hungarian algorithm on mask IoU
(``scipy.optimize.linear_sum_assignment``), and a matched pair counts as a hit when its IoU is
at least the threshold (0.5)::

    recall    = Σ_scenes hits / Σ_scenes |truth|
    precision = Σ_scenes hits / Σ_scenes |predictions|
    mean matched IoU = mean over true instances of the IoU with their Hungarian partner
                       (0 for a true instance left unmatched)

COCO mask AP is pycocotools' own ``COCOeval`` (``iouType="segm"``), class-agnostic
(``useCats=0``) unless asked otherwise. Foreground ARI is the adjusted Rand index (Hubert and
Arabie 1985) between the true and predicted instance labels of the pixels of the true
foreground; a pixel claimed by several predictions goes to the first (the parse order).

References:
    Kuhn (1955). The Hungarian method for the assignment problem.
    Hubert, Arabie (1985). Comparing partitions. Journal of Classification 2, 193–218.
    Lin et al. (2014). Microsoft COCO: common objects in context. ECCV.
    Adebayo et al. (2018). Sanity checks for saliency maps. NeurIPS.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "InstanceEvaluation",
    "Matching",
    "PredictedInstances",
    "adjusted_rand_index",
    "class_sensitivity",
    "coco_mask_ap",
    "foreground_ari",
    "mask_ious",
    "match_instances",
    "occluded_iou",
]


def _as_masks(masks: torch.Tensor | np.ndarray | Sequence, name: str) -> np.ndarray:
    """``(N, H, W)`` bool numpy array from a tensor, array or sequence of ``(H, W)`` masks."""
    if isinstance(masks, torch.Tensor):
        arr = masks.detach().cpu().numpy()
    elif isinstance(masks, np.ndarray):
        arr = masks
    else:
        items = [m.detach().cpu().numpy() if isinstance(m, torch.Tensor) else m for m in masks]
        arr = np.stack(items) if items else np.zeros((0, 0, 0), dtype=bool)
    if arr.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W) masks, got shape {arr.shape}")
    if arr.dtype != bool:
        raise TypeError(f"{name} must be bool masks, got {arr.dtype}")
    return arr


def mask_ious(pred: torch.Tensor | np.ndarray, true: torch.Tensor | np.ndarray) -> np.ndarray:
    """IoU of every predicted mask with every true mask: ``(P, H, W), (T, H, W) -> (P, T)``.
    Two empty masks have IoU 0 (nothing was found)."""
    p, t = _as_masks(pred, "pred"), _as_masks(true, "true")
    if len(p) and len(t) and p.shape[1:] != t.shape[1:]:
        raise ValueError(f"mask sizes differ: pred {p.shape[1:]}, true {t.shape[1:]}")
    hw = int(np.prod(p.shape[1:] if len(p) else t.shape[1:]))
    pf = p.reshape(len(p), hw).astype(np.float64)  # (P, HW)
    tf = t.reshape(len(t), hw).astype(np.float64)  # (T, HW)
    inter = pf @ tf.T  # (P, T)
    union = pf.sum(1)[:, None] + tf.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


@dataclass(frozen=True)
class Matching:
    """A one-to-one matching of predictions to true instances.

    :ivar ious: ``(P, T)`` mask IoU of every pair.
    :ivar pairs: ``(pred, true)`` index pairs of the Hungarian assignment (min(P, T) of them).
    """

    ious: np.ndarray
    pairs: tuple[tuple[int, int], ...]

    def hits(self, threshold: float = 0.5) -> int:
        """Matched pairs with IoU ≥ ``threshold``."""
        return sum(1 for p, t in self.pairs if self.ious[p, t] >= threshold)

    def partner_iou(self) -> np.ndarray:
        """``(T,)``: each true instance's IoU with its partner, 0 when it has none."""
        out = np.zeros(self.ious.shape[1])
        for p, t in self.pairs:
            out[t] = self.ious[p, t]
        return out

    def partner_of_true(self) -> dict[int, int]:
        """True index → predicted index of its partner."""
        return {t: p for p, t in self.pairs}


def match_instances(pred: torch.Tensor | np.ndarray, true: torch.Tensor | np.ndarray) -> Matching:
    """Hungarian matching of predicted to true masks maximising the summed IoU."""
    ious = mask_ious(pred, true)
    if 0 in ious.shape:
        return Matching(ious, ())
    rows, cols = linear_sum_assignment(ious, maximize=True)
    return Matching(ious, tuple((int(r), int(c)) for r, c in zip(rows, cols, strict=True)))


def adjusted_rand_index(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Adjusted Rand index of two labelings of the same items (1-D integer arrays).

    From the contingency table ``n_ij`` with row sums ``a_i`` and column sums ``b_j``::

        index    = Σ_ij C(n_ij, 2)
        expected = Σ_i C(a_i, 2) · Σ_j C(b_j, 2) / C(n, 2)
        ARI      = (index − expected) / (½ (Σ_i C(a_i, 2) + Σ_j C(b_j, 2)) − expected)

    1.0 when the denominator is 0 (both labelings trivial: one cluster, or all singletons),
    as in scikit-learn.
    """
    a, b = np.asarray(labels_true).ravel(), np.asarray(labels_pred).ravel()
    if a.shape != b.shape:
        raise ValueError(f"labelings differ in length: {a.shape} vs {b.shape}")
    n = a.size
    if n < 2:
        return 1.0
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1), dtype=np.float64)  # (classes, clusters)
    np.add.at(table, (ai, bi), 1.0)

    def comb2(x: np.ndarray) -> float:
        return float((x * (x - 1) / 2).sum())

    index = comb2(table)
    sum_a, sum_b = comb2(table.sum(1)), comb2(table.sum(0))
    expected = sum_a * sum_b / (n * (n - 1) / 2)
    max_index = (sum_a + sum_b) / 2
    if max_index == expected:
        return 1.0
    return (index - expected) / (max_index - expected)


def _label_map(masks: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` int: 1 + index of the first mask covering each pixel, 0 where none does."""
    labels = np.zeros(shape, dtype=np.int64)
    for i in range(len(masks) - 1, -1, -1):  # the first mask wins: write it last
        labels[masks[i]] = i + 1
    return labels


def foreground_ari(pred: torch.Tensor | np.ndarray, true: torch.Tensor | np.ndarray) -> float:
    """Adjusted Rand index over the true foreground pixels (the union of ``true``'s masks).

    :param pred: ``(P, H, W)`` bool predicted masks in parse order (a pixel claimed by several
        goes to the first; unclaimed pixels form one "no instance" cluster).
    :param true: ``(T, H, W)`` bool true visible masks (disjoint).
    """
    t = _as_masks(true, "true")
    if len(t) == 0:
        raise ValueError("foreground ARI needs at least one true instance")
    p = _as_masks(pred, "pred")
    shape = t.shape[1:]
    if len(p) and p.shape[1:] != shape:
        raise ValueError(f"mask sizes differ: pred {p.shape[1:]}, true {shape}")
    fg = t.any(0)
    return adjusted_rand_index(_label_map(t, shape)[fg], _label_map(p, shape)[fg])


def class_sensitivity(
    saliency: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray
) -> float:
    """Share of a map's positive mass inside ``mask``: Σ_{mask} max(s, 0) / Σ max(s, 0).

    :param saliency: ``(H, W)`` or ``(C, H, W)`` (channels summed after the positive part).
    :param mask: ``(H, W)`` bool, the queried instance's visible mask.
    0 when the map has no positive mass (it points nowhere).
    """
    s = saliency.detach().cpu().numpy() if isinstance(saliency, torch.Tensor) else saliency
    m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    s = np.clip(np.asarray(s, dtype=np.float64), 0.0, None)
    if s.ndim == 3:
        s = s.sum(0)
    if s.shape != m.shape or m.dtype != bool:
        raise ValueError(f"need an (H, W) map and bool mask of one size, got {s.shape}, {m.shape}")
    total = s.sum()
    return float(s[m].sum() / total) if total > 0 else 0.0


def occluded_iou(
    pred_amodal: torch.Tensor | np.ndarray,
    true_amodal: torch.Tensor | np.ndarray,
    true_visible: torch.Tensor | np.ndarray,
) -> float:
    """IoU on the occluded pixels alone: the predicted and true amodal masks with the true
    visible part removed, so only the completion is scored (an invented completion elsewhere
    counts against it). 0 when both are empty."""
    pa, ta, tv = (_as_masks(np.asarray(m)[None], "amodal/visible mask")[0]
                  for m in (pred_amodal, true_amodal, true_visible))  # fmt: skip
    hidden_pred, hidden_true = pa & ~tv, ta & ~tv
    return float(mask_ious(hidden_pred[None], hidden_true[None])[0, 0])


@dataclass(frozen=True)
class PredictedInstances:
    """One method's instances on one scene: ``masks`` ``(P, H, W)`` bool (visible part),
    ``scores`` ``(P,)`` (higher = more confident; ranks them for AP), ``categories``."""

    masks: np.ndarray
    scores: np.ndarray
    categories: tuple[str, ...]

    def __post_init__(self) -> None:
        masks = _as_masks(self.masks, "masks")
        scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        if not (len(masks) == len(scores) == len(self.categories)):
            raise ValueError(
                f"{len(masks)} masks, {len(scores)} scores and {len(self.categories)} "
                "categories: need one of each per instance"
            )
        object.__setattr__(self, "masks", masks)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "categories", tuple(self.categories))

    @classmethod
    def empty(cls, shape: tuple[int, int]) -> PredictedInstances:
        return cls(np.zeros((0, *shape), dtype=bool), np.zeros(0), ())


def coco_mask_ap(
    preds: Sequence[PredictedInstances],
    truths: Sequence[PredictedInstances],
    *,
    categories: Sequence[str],
    use_categories: bool = False,
) -> dict[str, float]:
    """COCO mask AP of predictions over scenes, by ``pycocotools.cocoeval.COCOeval``.

    :param truths: per scene the true instances (their scores are ignored).
    :returns: ``{"ap": AP@[.5:.95], "ap50": AP@.5}``; 0 for both when nothing is predicted.
    """
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} predicted scenes for {len(truths)} true ones")
    cat_id = {c: i + 1 for i, c in enumerate(categories)}

    def rle(m: np.ndarray) -> dict:
        return mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))

    images, gts, dts = [], [], []
    for img_id, (pred, truth) in enumerate(zip(preds, truths, strict=True), start=1):
        h, w = truth.masks.shape[1:]
        images.append({"id": img_id, "height": int(h), "width": int(w)})
        for m, c in zip(truth.masks, truth.categories, strict=True):
            r = rle(m)
            gts.append({"id": len(gts) + 1, "image_id": img_id, "category_id": cat_id[c],
                        "segmentation": r, "area": float(mask_utils.area(r)),
                        "bbox": mask_utils.toBbox(r).tolist(), "iscrowd": 0})  # fmt: skip
        for m, s, c in zip(pred.masks, pred.scores, pred.categories, strict=True):
            dts.append({"image_id": img_id, "category_id": cat_id[c], "segmentation": rle(m),
                        "score": float(s)})  # fmt: skip
    if not dts or not gts:
        return {"ap": 0.0, "ap50": 0.0}
    # pycocotools prints progress to stdout; the benchmark's output stays readable without it.
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": gts,
                      "categories": [{"id": i, "name": c} for c, i in cat_id.items()]}  # fmt: skip
        gt.createIndex()
        dt = gt.loadRes(dts)
        ev = COCOeval(gt, dt, iouType="segm")
        ev.params.useCats = int(use_categories)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50 = (max(float(v), 0.0) for v in ev.stats[:2])  # -1 means "no such case": 0
    return {"ap": ap, "ap50": ap50}


@dataclass
class InstanceEvaluation:
    """Accumulates one method's parses over scenes; :meth:`summary` gives the metrics.

    ``add(pred, truth)`` per scene (``truth`` with the true visible masks and categories);
    optional ``pred_amodal`` ``(P, H, W)`` and ``true_amodal`` ``(T, H, W)`` score the
    completion of true instances occluded by at least ``min_occlusion``.
    """

    categories: Sequence[str]
    iou_threshold: float = 0.5
    min_occlusion: float = 0.1
    preds: list[PredictedInstances] = field(default_factory=list)
    truths: list[PredictedInstances] = field(default_factory=list)
    hits: int = 0
    n_pred: int = 0
    n_true: int = 0
    partner_ious: list[float] = field(default_factory=list)
    count_correct: int = 0
    aris: list[float] = field(default_factory=list)
    amodal_ious: list[float] = field(default_factory=list)
    hidden_ious: list[float] = field(default_factory=list)

    def add(
        self,
        pred: PredictedInstances,
        truth: PredictedInstances,
        *,
        pred_amodal: np.ndarray | None = None,
        true_amodal: np.ndarray | None = None,
    ) -> Matching:
        """Score one scene; returns its matching."""
        m = match_instances(pred.masks, truth.masks)
        self.preds.append(pred)
        self.truths.append(truth)
        self.hits += m.hits(self.iou_threshold)
        self.n_pred += len(pred.masks)
        self.n_true += len(truth.masks)
        self.partner_ious.extend(m.partner_iou().tolist())
        self.count_correct += int(len(pred.masks) == len(truth.masks))
        if len(truth.masks):
            self.aris.append(foreground_ari(pred.masks, truth.masks))
        if true_amodal is not None:
            pa = pred.masks if pred_amodal is None else _as_masks(pred_amodal, "pred_amodal")
            partner = m.partner_of_true()
            for t, (visible, amodal) in enumerate(zip(truth.masks, true_amodal, strict=True)):
                if amodal.sum() == 0 or 1 - visible.sum() / amodal.sum() < self.min_occlusion:
                    continue
                p = partner.get(t)
                guess = pa[p] if p is not None else np.zeros_like(amodal)
                self.amodal_ious.append(float(mask_ious(guess[None], amodal[None])[0, 0]))
                self.hidden_ious.append(occluded_iou(guess, amodal, visible))
        return m

    def summary(self) -> dict[str, float | int | None]:
        """The metrics under the README's names (None where nothing was measured)."""

        def mean(x: list[float]) -> float | None:
            return float(np.mean(x)) if x else None

        ap = coco_mask_ap(self.preds, self.truths, categories=self.categories)
        ap_cat = coco_mask_ap(self.preds, self.truths, categories=self.categories,
                              use_categories=True)  # fmt: skip
        return {
            "scenes": len(self.preds),
            "true_instances": self.n_true,
            "predicted_instances": self.n_pred,
            "recall_iou50": self.hits / self.n_true if self.n_true else None,
            "precision_iou50": self.hits / self.n_pred if self.n_pred else None,
            "mean_matched_iou": mean(self.partner_ious),
            "mask_ap": ap["ap"],
            "mask_ap50": ap["ap50"],
            "mask_ap_category": ap_cat["ap"],
            "count_accuracy": self.count_correct / len(self.preds) if self.preds else None,
            "foreground_ari": mean(self.aris),
            "occluded_instances": len(self.amodal_ious),
            "amodal_iou": mean(self.amodal_ious),
            "occluded_iou": mean(self.hidden_ious),
        }
