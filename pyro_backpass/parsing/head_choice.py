"""The parse's choice among one step's per-category heads (issue #11).

A parse step with per-category heads (each view's best mode of each category — or its
``HeadChoice.per_category`` best whose masks differ — by the descent verifier in a verified
parse) must pick one. By default it picks the head of largest stop
statistic (:class:`~pyro_backpass.parsing.StopCriterion`), a log-odds of "new object" fitted
to decide *whether to stop* on the step's chosen head; ``benchmarks/parse_first_step.py``
measured that it ranks the heads of one step at chance (AUC 0.45–0.49: it favours small masks).
:class:`HeadChoice` is a conditional logit fitted for the choice itself: on validation scenes,
the probability that a head is the one that matches a true instance is

    p(head) = softmax_heads( w · (x(head) − mean) / scale )

over the step's heads, with ``x`` = :func:`head_features` (LLR per amodal pixel, log visible
area, the backbone's log-probability of the head's category on its visible region and its
margin over the best other category, the category one-hot, and optionally the features of
:data:`EXTRA_HEAD_FEATURES`). The stop is still decided by the criterion, on the chosen head.

The first choice was fitted on first steps only, where nothing is claimed yet; on later steps
about a third of the chosen heads re-take an object an earlier step took (they are mostly
claimed: visible fraction median 0.31, against 0.96 for new ones; the diagnosis of
``benchmarks/parse_threshold.py``). A choice with ``extra=("visible fraction",)`` sees that;
it is fitted on every step of no-stop parses (``benchmarks/fit_head_choice.py --steps-from``,
whole, or with ``--keep-shipped`` only the new weight, ``fit_head_choice(..., base=)``). The
shipped choice is the first-step one with such a weight (the whole refit lost on test; the
README says what each measured).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch

__all__ = [
    "EXTRA_HEAD_FEATURES",
    "HEAD_CHOICE_FILE",
    "HEAD_FEATURES",
    "HEAD_IOU",
    "HEAD_POOL",
    "HeadChoice",
    "fit_head_choice",
    "head_features",
]

HEAD_CHOICE_FILE = "head_choice.json"
#: With ``HeadChoice.per_category`` m > 1, a step completes each group's ``HEAD_POOL * m`` best
#: modes to find m heads whose amodal masks overlap by IoU < ``HEAD_IOU``.
HEAD_POOL = 4
HEAD_IOU = 0.5
#: What :func:`head_features` returns, in order (the one-hot has one entry per category but
#: the first).
HEAD_FEATURES = (
    "llr per amodal pixel",
    "log(1 + visible pixels)",
    "class log-prob",
    "class log-prob minus the best other class's",
    "category one-hot (less the first)",
)
#: Optional features a choice may add after those (``HeadChoice.extra``): ``"visible
#: fraction"`` is visible / amodal pixels (1 where nothing of the head is claimed yet).
EXTRA_HEAD_FEATURES = ("visible fraction",)


def head_features(
    *,
    llr: float,
    visible: float,
    amodal: float,
    class_log_probs: Mapping[str, float],
    category: str,
    categories: Sequence[str],
    extra: Sequence[str] = (),
) -> list[float]:
    """One head's features: ``[llr / amodal, log(1 + visible), log p(category | region),
    that minus the largest other category's, one-hot of the category less the first, *extra]``.

    :param llr: its log-likelihood ratio against background.
    :param visible: its visible pixels (amodal less what earlier instances claimed), in the
        model's input frame; ``amodal``: its amodal pixels (≥ 1 counted).
    :param class_log_probs: category name → the backbone's log-probability of it on the
        head's visible region (:func:`~pyro_backpass.parsing.region_log_prob`); every name in
        ``categories``.
    :param extra: names from :data:`EXTRA_HEAD_FEATURES` appended in that order.
    """
    unknown = [e for e in extra if e not in EXTRA_HEAD_FEATURES]
    if unknown:
        raise ValueError(f"unknown extra head features {unknown}; known: {EXTRA_HEAD_FEATURES}")
    if category not in categories:
        raise ValueError(f"unknown category {category!r}; the choice knows {list(categories)}")
    missing = [c for c in categories if c not in class_log_probs]
    if missing:
        raise ValueError(f"class_log_probs lacks the categories {missing}")
    own = float(class_log_probs[category])
    other = max(float(class_log_probs[c]) for c in categories if c != category)
    x = [float(llr) / max(float(amodal), 1.0), math.log1p(max(float(visible), 0.0)), own,
         own - other, *(float(category == c) for c in categories[1:])]  # fmt: skip
    fraction = max(float(visible), 0.0) / max(float(amodal), 1.0)
    x += [fraction for name in extra if name == "visible fraction"]
    if not all(math.isfinite(v) for v in x):
        raise ValueError(f"head features must be finite, got {x}")
    return x


@dataclass(frozen=True)
class HeadChoice:
    """A fitted choice among a step's heads (see the module's docstring).

    :ivar categories: the categories whose heads it scores (the model's, in its order).
    :ivar weights: one per feature of :func:`head_features` (``4 + len(categories) - 1 +
        len(extra)``).
    :ivar mean: the features' means on the fit; ``scale``: their standard deviations.
    :ivar model_sha256: the fingerprint of the model it was fitted for
        (:func:`~pyro_backpass.parsing.model_fingerprint`), or None (not checked).
    :ivar extra: the optional features it weighs (names of :data:`EXTRA_HEAD_FEATURES`).
    :ivar per_category: the heads a parse step offers it per category and view: that
        group's best mode (by the verifier, else by LLR) and, when more than 1, the next
        best whose amodal masks overlap none taken before by IoU ≥ 0.5 (they are read among
        the group's ``HEAD_POOL × per_category`` best, completed for the purpose).
    :ivar refined_heads: read each head on its masks refined by the colour CRF (as the instance
        it would become reports them with ``refine_masks=True``, which it needs) instead of the
        readout's; what :attr:`ParsedInstance.heads` records then too. The stop statistic
        still reads the readout's masks, as its criterion was fitted.
    """

    categories: tuple[str, ...]
    weights: tuple[float, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    model_sha256: str | None = None
    extra: tuple[str, ...] = ()
    per_category: int = 1
    refined_heads: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.refined_heads, bool):
            raise ValueError(f"HeadChoice.refined_heads must be a bool, got {self.refined_heads!r}")
        if (isinstance(self.per_category, bool) or not isinstance(self.per_category, int)
                or self.per_category < 1):  # fmt: skip
            raise ValueError(f"HeadChoice.per_category must be an int >= 1, "
                             f"got {self.per_category!r}")  # fmt: skip
        object.__setattr__(self, "categories", tuple(str(c) for c in self.categories))
        object.__setattr__(self, "extra", tuple(str(e) for e in self.extra))
        unknown = [e for e in self.extra if e not in EXTRA_HEAD_FEATURES]
        if unknown or len(set(self.extra)) != len(self.extra):
            raise ValueError(f"HeadChoice.extra must be distinct names of {EXTRA_HEAD_FEATURES}, "
                             f"got {self.extra}")  # fmt: skip
        n = 4 + len(self.categories) - 1 + len(self.extra)
        for name in ("weights", "mean", "scale"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != n:
                raise ValueError(f"HeadChoice.{name}: {len(values)} values for {n} features "
                                 f"({len(self.categories)} categories)")  # fmt: skip
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"HeadChoice.{name} must be finite, got {values}")
            object.__setattr__(self, name, values)
        if len(self.categories) < 2 or len(set(self.categories)) != len(self.categories):
            raise ValueError(f"HeadChoice needs ≥ 2 distinct categories, got {self.categories}")
        if min(self.scale) <= 0:
            raise ValueError(f"HeadChoice.scale must be positive, got {self.scale}")

    @property
    def num_features(self) -> int:
        return len(self.weights)

    def score(self, features: Sequence[float]) -> float:
        """``w · (x − mean) / scale`` of one head's :func:`head_features`."""
        if len(features) != self.num_features:
            raise ValueError(f"need {self.num_features} features, got {len(features)}")
        return sum(w * (x - m) / s for w, x, m, s in
                   zip(self.weights, features, self.mean, self.scale, strict=True))  # fmt: skip

    def score_head(self, *, llr: float, visible: float, amodal: float,
                   class_log_probs: Mapping[str, float], category: str) -> float:  # fmt: skip
        """:meth:`score` of a head described by :func:`head_features`' arguments."""
        return self.score(head_features(llr=llr, visible=visible, amodal=amodal,
                                        class_log_probs=class_log_probs, category=category,
                                        categories=self.categories, extra=self.extra))  # fmt: skip

    def choose(self, heads: Sequence[Mapping[str, Any]]) -> int:
        """The index of the head of largest score among ``heads`` (ties: the first), each a
        mapping with :func:`head_features`' arguments (``llr``, ``visible``, ``amodal``,
        ``class_log_probs``, ``category``), as :func:`fit_head_choice` reads them."""
        if not heads:
            raise ValueError("choose needs at least one head")
        scores = [self.score(_features_of(h, self.categories, self.extra)) for h in heads]
        return max(range(len(scores)), key=scores.__getitem__)

    def fingerprint(self) -> str:
        """SHA-256 of :meth:`to_dict` (what a stop criterion fitted on its parses records)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """The record (``extra`` only when it has some, ``per_category`` only when it is not 1
        and ``refined_heads`` only when set, so a choice without them keeps the fingerprint it
        was shipped with)."""
        record = {"categories": list(self.categories), "weights": list(self.weights),
                  "mean": list(self.mean), "scale": list(self.scale),
                  "model_sha256": self.model_sha256}  # fmt: skip
        if self.extra:
            record["extra"] = list(self.extra)
        if self.per_category != 1:  # how its heads were found is part of what it was fitted on
            record.update(per_category=self.per_category, head_pool=HEAD_POOL, head_iou=HEAD_IOU)
        if self.refined_heads:
            record["refined_heads"] = True
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> HeadChoice:
        keys = {"categories", "weights", "mean", "scale", "model_sha256", "extra", "per_category",
                "head_pool", "head_iou", "refined_heads"}  # fmt: skip
        if not {"categories", "weights", "mean", "scale"} <= set(record) <= keys:
            raise ValueError(f"not a HeadChoice record: keys {sorted(record)}")
        if record.get("per_category", 1) != 1 and (record.get("head_pool"), record.get(
                "head_iou")) != (HEAD_POOL, HEAD_IOU):  # fmt: skip
            raise ValueError(f"the choice was fitted on heads found among head_pool="
                             f"{record.get('head_pool')} x per_category modes at IoU < "
                             f"{record.get('head_iou')}; this version finds them with "
                             f"{HEAD_POOL} and {HEAD_IOU}: refit it")  # fmt: skip
        return cls(tuple(record["categories"]), tuple(record["weights"]), tuple(record["mean"]),
                   tuple(record["scale"]), record.get("model_sha256"),
                   tuple(record.get("extra", ())), record.get("per_category", 1),
                   record.get("refined_heads", False))  # fmt: skip

    @classmethod
    def shipped(cls) -> HeadChoice | None:
        """The choice shipped in the package (fitted for ``GenerativeModel.default()`` and the
        shipped descent verifier, ``benchmarks/fit_head_choice.py --ship``), or None."""
        ref = resources.files("pyro_backpass").joinpath("weights", HEAD_CHOICE_FILE)
        if not ref.is_file():
            return None
        return cls.from_dict(json.loads(ref.read_text())["head_choice"])


def fit_head_choice(
    groups: Sequence[Sequence[Mapping[str, Any]]],
    *,
    categories: Sequence[str],
    l2: float = 1.0,
    model_sha256: str | None = None,
    extra: Sequence[str] = (),
    base: HeadChoice | None = None,
    per_category: int = 1,
    refined_heads: bool = False,
) -> HeadChoice:
    """Fit a :class:`HeadChoice` by maximum penalised likelihood of the hitting heads.

    :param groups: one list per step (scene) of its heads, each a mapping with the arguments of
        :func:`head_features` (``llr``, ``visible``, ``amodal``, ``class_log_probs``,
        ``category``) and ``hit`` (bool: it matches a true instance). The objective is
        Σ_steps log Σ_{heads that hit} p(head) − l2 |w|² on standardised features; steps
        where no head hits say nothing about the choice and are left out.
    :param l2: the penalty's weight (≥ 0).
    :param extra: the optional features to weigh as well (:data:`EXTRA_HEAD_FEATURES`).
    :param base: a fitted choice to keep: its weights, means and scales are fixed and only
        the features of ``extra`` it lacks are fitted (a correction of ``base``, e.g. a
        first-step choice taught to avoid claimed heads on later steps); its categories must
        be ``categories`` and its ``extra`` a prefix of ``extra``.
    :param per_category: the fitted choice's :attr:`HeadChoice.per_category` (the heads a step
        offered per category when ``groups`` were recorded); ``refined_heads``: its
        :attr:`HeadChoice.refined_heads` (the heads' masks were the CRF's).
    """
    categories, extra = tuple(categories), tuple(extra)
    if isinstance(per_category, bool) or not isinstance(per_category, int) or per_category < 1:
        raise ValueError(f"per_category must be an int >= 1, got {per_category!r}")
    if base is not None and (base.categories != categories
                             or base.extra != extra[: len(base.extra)]
                             or len(base.extra) == len(extra)):  # fmt: skip
        raise ValueError(f"base must be a choice for {categories} whose extra features "
                         f"{base.extra} are a proper prefix of {extra}")  # fmt: skip
    if not (isinstance(l2, (int, float)) and math.isfinite(l2) and l2 >= 0):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2!r}")
    usable = [g for g in groups if len(g) >= 2 and any(bool(h["hit"]) for h in g)]
    if not usable:
        raise ValueError("no step has two or more heads of which one hits: nothing to fit")
    feats = [[_features_of(h, categories, extra) for h in g] for g in usable]
    flat = torch.tensor([x for g in feats for x in g], dtype=torch.float64)  # (heads, F)
    mean, scale = flat.mean(0), flat.std(0)
    scale = torch.where(scale > 1e-9, scale, torch.ones_like(scale))  # a constant feature
    fixed = torch.zeros(0, dtype=torch.float64)  # base's weights, kept
    if base is not None:
        n = base.num_features
        fixed = torch.tensor(base.weights, dtype=torch.float64)
        mean[:n] = torch.tensor(base.mean, dtype=torch.float64)
        scale[:n] = torch.tensor(base.scale, dtype=torch.float64)
    w = torch.zeros(flat.shape[1] - len(fixed), dtype=torch.float64, requires_grad=True)
    width = max(len(g) for g in usable)  # the steps padded to one tensor
    z = torch.zeros(len(usable), width, flat.shape[1], dtype=torch.float64)  # (G, H, F)
    valid = torch.zeros(len(usable), width, dtype=torch.bool)  # (G, H)
    hit = torch.zeros(len(usable), width, dtype=torch.bool)  # (G, H)
    for i, (g, x) in enumerate(zip(usable, feats, strict=True)):
        z[i, : len(g)] = (torch.tensor(x, dtype=torch.float64) - mean) / scale
        valid[i, : len(g)] = True
        hit[i, : len(g)] = torch.tensor([bool(h["hit"]) for h in g])
    opt = torch.optim.LBFGS([w], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = (z @ torch.cat([fixed, w])).masked_fill(~valid, -math.inf)  # (G, H)
        logp = torch.log_softmax(logits, 1)
        value = l2 * (w @ w) - torch.logsumexp(logp.masked_fill(~hit, -math.inf), 1).sum()
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(closure)
    weights = torch.cat([fixed, w.detach()])
    return HeadChoice(categories, tuple(weights.tolist()), tuple(mean.tolist()),
                      tuple(scale.tolist()), model_sha256, extra, per_category,
                      refined_heads)  # fmt: skip


def _features_of(
    head: Mapping[str, Any], categories: Sequence[str], extra: Sequence[str] = ()
) -> list[float]:
    """:func:`head_features` of a head given as a mapping of its arguments."""
    return head_features(llr=head["llr"], visible=head["visible"], amodal=head["amodal"],
                         class_log_probs=head["class_log_probs"], category=head["category"],
                         categories=categories, extra=extra)  # fmt: skip
