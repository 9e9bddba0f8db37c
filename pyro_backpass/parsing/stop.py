"""The scene parser's stop statistic: the log-odds that a step's instance is a new object.

Each step of a parse takes the best hypothesis; the parse stops when that hypothesis's stop
statistic is at or below a threshold. The paper's statistic is the log-likelihood ratio (LLR)
of the hypothesis against an all-background explanation. On the shipped model it is *inverted*
on validation scenes (ROC AUC 0.30 for "this step finds a new object": a true object predicts
many on-elements, and every one of them the scene does not show costs it more than a small
hypothesis on clutter loses), so the shipped criterion is a logistic function of a few
features of the step, fitted on validation parses (:func:`fit_stop_criterion`)::

    statistic = bias + Σ_f weight_f · (x_f − mean_f) / scale_f

with the features (:data:`STOP_FEATURES`) ``llr`` (the LLR itself), ``log_visible`` (log of
1 + the instance's visible pixels: what it adds to the parse), ``visible_fraction`` (visible ÷
amodal pixels: how much of it earlier instances have not already claimed), ``step`` (how many
instances the parse has: a prior on counts) and, optionally, ``class_log_prob`` (the
backbone's classifier's log-probability of the instance's category on its visible region
shown alone, :func:`region_log_prob`: does what the step adds look like an object of its
category to the CNN). :meth:`StopCriterion.llr` is the paper's statistic alone (the fallback
for models without a fitted criterion).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from pyro_backpass.inference.verification import region_views

if TYPE_CHECKING:
    from pyro_backpass.backbone import Backbone

__all__ = [
    "STOP_FEATURES",
    "StopCriterion",
    "fit_stop_criterion",
    "region_log_prob",
    "stop_features",
]

#: The features a stop criterion may weigh (see the module's docstring).
STOP_FEATURES = ("llr", "log_visible", "visible_fraction", "step", "class_log_prob")


def stop_features(
    *, llr: float, visible: float, amodal: float, step: int, class_log_prob: float | None = None
) -> dict[str, float]:
    """The features of one step's instance: its LLR against background, its visible and amodal
    pixel counts (in the model's input frame: the parser scales a view's counts to it), how
    many instances the parse had before it and, when given, the classifier's log-probability
    of its category on its visible region (:func:`region_log_prob`)."""
    out = {
        "llr": float(llr),
        "log_visible": math.log1p(max(float(visible), 0.0)),
        "visible_fraction": float(visible) / float(amodal) if float(amodal) > 0 else 0.0,
        "step": float(step),
    }
    if class_log_prob is not None:
        out["class_log_prob"] = float(class_log_prob)
    return out


@torch.no_grad()
def region_log_prob(
    backbone: Backbone, image: torch.Tensor, masks: torch.Tensor, categories: Any
) -> torch.Tensor:
    """``(k,)`` float64: the backbone's classifier's log-probability of ``categories[i]`` (an
    index into the backbone's classes) on ``image`` ``(3, S, S)`` (the model's input, in
    [0, 1]) shown only inside ``masks[i]`` ``(k, S, S)`` bool, its median colour elsewhere
    (:func:`~pyro_backpass.inference.region_views`, the descent verifier's view)."""
    if getattr(backbone, "head", None) is None:
        raise ValueError("the stop feature class_log_prob needs a backbone with a classifier "
                         "head; this criterion weighs it")  # fmt: skip
    if masks.dim() != 3 or masks.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"masks must be (k, H, W) over the image {tuple(image.shape[-2:])}, "
                         f"got {tuple(masks.shape)}")  # fmt: skip
    idx = torch.as_tensor(categories).reshape(-1)
    if idx.numel() != masks.shape[0]:
        raise ValueError(f"need one category per mask: {idx.numel()} for {masks.shape[0]} masks")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= len(backbone.categories)):
        raise ValueError(f"category indices must lie in [0, {len(backbone.categories)}), "
                         f"got {idx.tolist()}")  # fmt: skip
    device, dtype = backbone.mean.device, backbone.mean.dtype
    views = region_views(image.to(device=device, dtype=dtype).clamp(0, 1), masks.to(device))
    logp = torch.log_softmax(backbone.logits(backbone(views)), -1)  # (k, classes)
    return logp.gather(1, idx.to(device)[:, None])[:, 0].double().cpu()


def _finite_map(name: str, values: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in dict(values).items():
        if key not in STOP_FEATURES:
            raise ValueError(f"StopCriterion {name}: unknown feature {key!r}; use {STOP_FEATURES}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, (bool, str)) or not math.isfinite(number):
            raise ValueError(f"StopCriterion {name}[{key!r}] must be finite, got {value!r}")
        out[key] = number
    return out


@dataclass(frozen=True)
class StopCriterion:
    """``bias + Σ_f weight_f · (x_f − mean_f) / scale_f`` over :data:`STOP_FEATURES`.

    :ivar weights: feature → weight (features absent weigh 0).
    :ivar bias: the log-odds at the mean features.
    :ivar mean: feature → the mean it is centred on (default 0).
    :ivar scale: feature → the scale it is divided by (default 1, must be > 0).
    """

    weights: Mapping[str, float]
    bias: float = 0.0
    mean: Mapping[str, float] = field(default_factory=dict)
    scale: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", _finite_map("weights", self.weights))
        object.__setattr__(self, "mean", _finite_map("mean", self.mean))
        object.__setattr__(self, "scale", _finite_map("scale", self.scale))
        try:
            bias = float(self.bias)
        except (TypeError, ValueError):
            bias = math.nan
        if isinstance(self.bias, (bool, str)) or not math.isfinite(bias):
            raise ValueError(f"StopCriterion bias must be a finite number, got {self.bias!r}")
        object.__setattr__(self, "bias", bias)
        bad = {k: v for k, v in self.scale.items() if v <= 0}
        if bad:
            raise ValueError(f"StopCriterion scales must be > 0, got {bad}")

    def __hash__(self) -> int:
        items = [tuple(sorted(m.items())) for m in (self.weights, self.mean, self.scale)]
        return hash((*items, self.bias))

    @classmethod
    def llr(cls) -> StopCriterion:
        """The paper's statistic: the log-likelihood ratio against background, unchanged."""
        return cls({"llr": 1.0})

    @property
    def is_llr(self) -> bool:
        """Whether the statistic is the LLR itself."""
        return self == StopCriterion.llr()

    @property
    def needs_class_log_prob(self) -> bool:
        """Whether the statistic weighs ``class_log_prob`` (a classifier pass a step)."""
        return "class_log_prob" in self.weights

    def statistic(
        self, *, llr: float, visible: float, amodal: float, step: int,
        class_log_prob: float | None = None,
    ) -> float:  # fmt: skip
        """The stop statistic of one step's instance (see :func:`stop_features`);
        ``class_log_prob`` is required when the criterion weighs it."""
        if class_log_prob is None and self.needs_class_log_prob:
            raise ValueError("this stop criterion weighs class_log_prob: pass it "
                             "(region_log_prob of the instance's visible region)")  # fmt: skip
        x = stop_features(llr=llr, visible=visible, amodal=amodal, step=step,
                          class_log_prob=class_log_prob)  # fmt: skip
        return self.bias + sum(
            w * (x[f] - self.mean.get(f, 0.0)) / self.scale.get(f, 1.0)
            for f, w in self.weights.items()
        )

    def to_dict(self) -> dict[str, Any]:
        return {"weights": dict(self.weights), "bias": self.bias, "mean": dict(self.mean),
                "scale": dict(self.scale)}  # fmt: skip

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> StopCriterion:
        unknown = set(record) - {"weights", "bias", "mean", "scale"}
        if unknown or "weights" not in record:
            raise ValueError(f"not a StopCriterion record: keys {sorted(record)}")
        return cls(record["weights"], record.get("bias", 0.0), record.get("mean", {}),
                   record.get("scale", {}))  # fmt: skip


def fit_stop_criterion(
    steps: Sequence[Mapping[str, float]],
    labels: Sequence[bool],
    *,
    features: Sequence[str] | None = None,
    l2: float = 1.0,
) -> StopCriterion:
    """Logistic regression of "new object" on standardised features, L2-penalised weights.

    Maximises ``Σ_n log σ(±statistic_n) − l2/2 · ‖w‖²`` (the bias is not penalised) by
    L-BFGS in float64. ``steps``: one :func:`stop_features` dict per labelled step;
    ``features``: the ones weighed (None: every feature of :data:`STOP_FEATURES` that every
    step has).
    """
    if len(steps) != len(labels) or not steps:
        raise ValueError(f"need as many labels as steps (>= 1), got {len(steps)}, {len(labels)}")
    if features is None:
        features = [f for f in STOP_FEATURES if all(f in s for s in steps)]
    features = tuple(features)
    if len(set(features)) != len(features):
        raise ValueError(f"features must not repeat, got {features}")
    unknown = [f for f in features if f not in STOP_FEATURES]
    if unknown or not features:
        raise ValueError(f"features must be a non-empty subset of {STOP_FEATURES}, got {features}")
    missing = sorted({f for s in steps for f in features if f not in s})
    if missing:
        raise ValueError(f"some steps lack the features {missing}")
    y = torch.tensor([bool(v) for v in labels], dtype=torch.float64)
    if bool(y.all()) or not bool(y.any()):
        raise ValueError("the steps need both labels (some new objects and some not)")
    x = torch.tensor([[float(s[f]) for f in features] for s in steps], dtype=torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("the step features must be finite")
    mean, scale = x.mean(0), x.std(0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    z = (x - mean) / scale  # (N, F)
    w = torch.zeros(len(features), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-10,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        nll = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, reduction="sum")
        loss = nll + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return StopCriterion(
        {f: float(v) for f, v in zip(features, w.detach(), strict=True)}, float(b.detach()),
        {f: float(v) for f, v in zip(features, mean, strict=True)},
        {f: float(v) for f, v in zip(features, scale, strict=True)},
    )  # fmt: skip
