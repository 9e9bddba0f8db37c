"""A learned choice among completed descents (issue #10): which of greedy's top-k hypotheses is
an object of the category, not clutter.

The model's own score ranks the true top-level hypothesis of an airplane in clutter about 14th
of 500, yet completing the best few descents finds one that covers the airplane in most scenes.
A :class:`DescentVerifier` re-scores those completed descents: a linear function, one weight
vector per category (or, per category, the mean of a small ensemble of one-hidden-layer ReLU
networks), of each descent's features (computed by
:func:`~pyro_backpass.inference.descent_features`): the model's log-likelihood ratio against
the all-background explanation on each hidden level, its prior terms, the log of its mask's
area, and what the backbone sees in the image region the descent claims. It is fitted on
training scenes by :func:`~pyro_backpass.learning.fit_descent_verifier` and used by
:func:`~pyro_backpass.inference.verified_map`. It is not part of the Bayes net: the MAP of the
model stays :func:`~pyro_backpass.greedy_map`'s.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

from pyro_backpass.files import atomic_write, read_safetensors

__all__ = ["DescentVerifier", "LOWER_VERIFIER_FILE", "REFINED_VERIFIER_FILE", "VERIFIER_FILE"]

VERIFIER_FILE = "descent_verifier.safetensors"
#: The second stage's verifier (``levels_below`` > 0), shipped beside the first stage's.
LOWER_VERIFIER_FILE = "descent_verifier_lower.safetensors"
#: A first stage fitted on CRF-refined masks that chooses by consensus (airplane only), shipped
#: beside the default one: ``DescentVerifier.shipped(refined=True)``.
REFINED_VERIFIER_FILE = "descent_verifier_crf.safetensors"
_CONFIG_KEY = "pyro_backpass.descent_verifier"
#: Version 1: linear scores only; version 2 adds the per-category hidden-layer ensembles. A
#: verifier without hidden layers is written (and fingerprinted) as version 1.
FORMAT_VERSION = 2
_READS = (1, 2)
_HIDDEN = ("hidden_weight", "hidden_bias", "out_weight", "nonlinear")
#: config beyond the scoring
_SETUP = ("categories", "read_levels", "top_k", "model_sha256", "levels_below",
          "first_stage_sha256", "refine_masks")  # fmt: skip


class DescentVerifier:
    """Per-category scores of completed descents' features: linear, or an ensemble of
    one-hidden-layer ReLU networks.

    For category ``c`` with standardised features ``x = (features − mean[c]) / scale[c]``
    ``(k, F)`` the score is ``x @ weight[c]``, or, where ``nonlinear[c]``, the mean over the
    ensemble's ``E`` networks of ``relu(x @ hidden_weight[c, e] + hidden_bias[c, e]) @
    out_weight[c, e]``. Scores compare descents of one image and category only (their fit
    leaves a constant per list free).

    :param categories: the model's category names, in its order.
    :param read_levels: backbone levels whose activations of the claimed region are features.
    :param weight: ``(N, F)`` one weight vector per category (zeros where ``nonlinear``).
    :param mean, scale: ``(N, F)`` the features' standardisation per category.
    :param fitted: ``(N,)`` bool: which categories have fitted weights; scoring another raises.
    :param top_k: how many of greedy's best top-level hypotheses are completed and re-scored
        (for a second stage: by the first stage it was fitted behind).
    :param levels_below: 0 for a first stage (it chooses the top level among ``top_k``
        descents); n > 0 for a second stage, which chooses among the completions of every
        joint (γ, δ) of the n levels under a kept top level
        (:func:`~pyro_backpass.inference.lower_completions`).
    :param first_stage_sha256: for a second stage, the :meth:`fingerprint` of the first stage
        it was fitted behind (None: not recorded); ``verified_map(lower=None)`` pairs them by it.
    :param model_sha256: fingerprint of the generative model it was fitted for (None: unknown).
    :param refine_masks: its features were computed on the descents' masks refined by the
        colour CRF (``descent_features(refine=True)``); ``verified_map`` computes them so.
    :param consensus: the choice rule of a first stage. None: the descent scored highest;
        τ > 0: the descent whose mask has the highest expected IoU with the k descents' masks
        under the softmax of their scores / τ (a minimum-Bayes-risk choice for mask IoU:
        :func:`~pyro_backpass.inference.expected_iou`); see :meth:`with_consensus`.
    :param hidden_weight: ``(N, E, F, H)``, :param hidden_bias: ``(N, E, H)``,
        :param out_weight: ``(N, E, H)``, :param nonlinear: ``(N,)`` bool — the ensembles, all
        four or none (None: every category linear).
    """

    def __init__(
        self,
        *,
        categories: Sequence[str],
        read_levels: Sequence[str],
        weight: torch.Tensor,
        mean: torch.Tensor,
        scale: torch.Tensor,
        fitted: torch.Tensor,
        top_k: int,
        model_sha256: str | None = None,
        levels_below: int = 0,
        first_stage_sha256: str | None = None,
        refine_masks: bool = False,
        consensus: float | None = None,
        hidden_weight: torch.Tensor | None = None,
        hidden_bias: torch.Tensor | None = None,
        out_weight: torch.Tensor | None = None,
        nonlinear: torch.Tensor | None = None,
    ) -> None:
        n = len(categories)
        weight, mean, scale = (
            torch.as_tensor(t, dtype=torch.float64) for t in (weight, mean, scale)
        )
        fitted = torch.as_tensor(fitted, dtype=torch.bool)
        if weight.dim() != 2 or weight.shape[0] != n:
            raise ValueError(f"weight must be (N={n}, F), got {tuple(weight.shape)}")
        for name, t in (("mean", mean), ("scale", scale)):
            if t.shape != weight.shape:
                raise ValueError(f"{name} must have weight's shape {tuple(weight.shape)}, "
                                 f"got {tuple(t.shape)}")  # fmt: skip
        if fitted.shape != (n,):
            raise ValueError(f"fitted must be ({n},) bool, got {tuple(fitted.shape)}")
        if not bool(torch.isfinite(weight).all() & torch.isfinite(mean).all()):
            raise ValueError("DescentVerifier: weight and mean must be finite")
        if not bool((scale > 0).all()):
            raise ValueError("DescentVerifier: scale must be positive")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 2:
            raise ValueError(f"top_k must be an int >= 2 (a choice among descents), got {top_k!r}")
        self.categories = tuple(categories)
        self.read_levels = tuple(read_levels)
        self.weight, self.mean, self.scale, self.fitted = weight, mean, scale, fitted
        if isinstance(levels_below, bool) or not isinstance(levels_below, int) or levels_below < 0:
            raise ValueError(f"levels_below must be an int >= 0, got {levels_below!r}")
        self.top_k = top_k
        if first_stage_sha256 is not None and not levels_below:
            raise ValueError("first_stage_sha256 is for a second stage (levels_below > 0)")
        self.levels_below = levels_below
        self.first_stage_sha256 = first_stage_sha256
        if not isinstance(refine_masks, bool):
            raise TypeError(f"refine_masks must be a bool, got {refine_masks!r}")
        self.refine_masks = refine_masks
        if consensus is not None:
            if isinstance(consensus, bool) or not isinstance(consensus, (int, float)):
                raise TypeError(f"consensus must be None or a temperature > 0, got {consensus!r}")
            if not (consensus > 0 and math.isfinite(consensus)):
                raise ValueError(f"consensus must be a finite temperature > 0, got {consensus!r}")
            if levels_below:
                raise ValueError("consensus is the first stage's choice rule (levels_below 0)")
            consensus = float(consensus)
        self.consensus = consensus
        self.model_sha256 = model_sha256
        parts = (hidden_weight, hidden_bias, out_weight, nonlinear)
        if any(t is None for t in parts) and not all(t is None for t in parts):
            raise ValueError(f"pass all of {list(_HIDDEN)} or none")
        self.hidden_weight = self.hidden_bias = self.out_weight = None
        self.nonlinear = torch.zeros(n, dtype=torch.bool)
        if hidden_weight is not None:
            w1, b1, w2 = (torch.as_tensor(t, dtype=torch.float64)
                          for t in (hidden_weight, hidden_bias, out_weight))  # fmt: skip
            f = weight.shape[1]
            if w1.dim() != 4 or w1.shape[0] != n or w1.shape[2] != f:
                raise ValueError(f"hidden_weight must be (N={n}, E, F={f}, H), "
                                 f"got {tuple(w1.shape)}")  # fmt: skip
            e, h = w1.shape[1], w1.shape[3]
            for name, t in (("hidden_bias", b1), ("out_weight", w2)):
                if t.shape != (n, e, h):
                    raise ValueError(f"{name} must be ({n}, {e}, {h}), got {tuple(t.shape)}")
            nonlinear = torch.as_tensor(nonlinear, dtype=torch.bool)
            if nonlinear.shape != (n,):
                raise ValueError(f"nonlinear must be ({n},) bool, got {tuple(nonlinear.shape)}")
            if e < 1 or h < 1:
                raise ValueError(f"an ensemble needs E >= 1 networks of H >= 1 units, got {e}, {h}")
            if not all(bool(torch.isfinite(t).all()) for t in (w1, b1, w2)):
                raise ValueError("DescentVerifier: the hidden layers' weights must be finite")
            self.hidden_weight, self.hidden_bias, self.out_weight = w1, b1, w2
            self.nonlinear = nonlinear

    @property
    def num_features(self) -> int:
        return self.weight.shape[1]

    @property
    def has_hidden(self) -> bool:
        """Whether any category is scored by a hidden-layer ensemble."""
        return self.hidden_weight is not None and bool(self.nonlinear.any())

    @property
    def fitted_categories(self) -> tuple[str, ...]:
        return tuple(c for c, f in zip(self.categories, self.fitted.tolist(), strict=True) if f)

    def score(self, features: torch.Tensor, category: int) -> torch.Tensor:
        """``(k,)`` scores of ``k`` descents of ``category`` from their features ``(k, F)``."""
        if not 0 <= int(category) < len(self.categories):
            raise ValueError(f"unknown category index {category}; the verifier knows "
                             f"{list(self.categories)}")  # fmt: skip
        if not bool(self.fitted[category]):
            raise ValueError(
                f"the descent verifier has no weights for {self.categories[category]!r}; it was "
                f"fitted for {list(self.fitted_categories)} (fit_descent_verifier(categories=...))"
            )
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(
                f"features must be (k, {self.num_features}), got {tuple(features.shape)}: "
                "computed for another model or other read levels?"
            )
        if not bool(torch.isfinite(features).all()):
            raise ValueError("descent features contain NaN or inf")
        x = (features.to(self.weight) - self.mean[category]) / self.scale[category]  # (k, F)
        if not bool(self.nonlinear[category]):
            return x @ self.weight[category]
        h = torch.relu(
            torch.einsum("kf,efh->ekh", x, self.hidden_weight[category])
            + self.hidden_bias[category][:, None]
        )  # (E, k, H)
        return torch.einsum("ekh,eh->ek", h, self.out_weight[category]).mean(0)

    def same_setup(self, other: DescentVerifier) -> bool:
        """Whether both were made for the same model, categories, features and ``top_k`` (so
        one category's scoring can move from one to the other)."""
        return all(self.config().get(k) == other.config().get(k) for k in _SETUP)

    def with_category(self, other: DescentVerifier, category: int | str) -> DescentVerifier:
        """A copy of this verifier whose ``category`` is scored as ``other`` scores it (its
        weights, standardisation and ensemble); ``other`` must share the config."""
        if isinstance(category, str):
            if category not in self.categories:
                raise ValueError(f"unknown category {category!r}; the verifier knows "
                                 f"{list(self.categories)}")  # fmt: skip
            c = self.categories.index(category)
        elif isinstance(category, int) and not isinstance(category, bool):
            if not 0 <= category < len(self.categories):
                raise ValueError(f"category index {category} out of range for "
                                 f"{len(self.categories)} categories")  # fmt: skip
            c = category
        else:
            raise TypeError(f"category must be a name or an index, got {category!r}")
        if not self.same_setup(other):
            mine, theirs = ({k: v.config().get(k) for k in _SETUP} for v in (self, other))
            raise ValueError(f"the verifiers differ in config: {mine} vs {theirs}")
        state = {k: getattr(self, k).clone() for k in ("weight", "mean", "scale", "fitted")}
        for k in state:
            state[k][c] = getattr(other, k)[c]
        hidden = None
        others = self.nonlinear.clone()
        others[c] = False  # this verifier's ensembles that stay
        if other.has_hidden and bool(other.nonlinear[c]):
            n = len(self.categories)
            keep = self.has_hidden and bool(others.any())
            if keep and self.hidden_weight.shape[1:] != other.hidden_weight.shape[1:]:
                mine, theirs = (tuple(v.hidden_weight.shape[1:]) for v in (self, other))
                raise ValueError(f"the verifiers' ensembles differ in size ({mine} vs {theirs}) "
                                 "and this one keeps ensembles for other categories")  # fmt: skip
            hidden = {k: (getattr(self, k).clone() if keep else
                          torch.zeros(n, *getattr(other, k).shape[1:], dtype=torch.float64))
                      for k in _HIDDEN[:3]}  # fmt: skip
            hidden["nonlinear"] = others
            for k in _HIDDEN:
                hidden[k][c] = getattr(other, k)[c]
        elif self.has_hidden and bool(others.any()):
            hidden = {k: getattr(self, k).clone() for k in _HIDDEN[:3]}
            for k in _HIDDEN[:3]:
                hidden[k][c] = 0.0  # no stale weights: they would enter the fingerprint
            hidden["nonlinear"] = others
        return DescentVerifier(**self._setup(), **state, **(hidden or {}))

    def with_consensus(self, temperature: float | None) -> DescentVerifier:
        """A copy of this verifier that chooses by expected mask IoU at ``temperature`` (None:
        by its highest score); the weights are shared."""
        hidden = {k: getattr(self, k) for k in _HIDDEN} if self.hidden_weight is not None else {}
        return DescentVerifier(**{**self._setup(), "consensus": temperature}, weight=self.weight,
                               mean=self.mean, scale=self.scale, fitted=self.fitted,
                               **hidden)  # fmt: skip

    def _setup(self) -> dict:
        """The constructor's arguments beyond the weights: what a copy keeps."""
        return {"categories": self.categories, "read_levels": self.read_levels,
                "top_k": self.top_k, "model_sha256": self.model_sha256,
                "levels_below": self.levels_below, "first_stage_sha256": self.first_stage_sha256,
                "refine_masks": self.refine_masks, "consensus": self.consensus}  # fmt: skip

    def _tensors(self) -> dict[str, torch.Tensor]:
        state = {"weight": self.weight, "mean": self.mean, "scale": self.scale,
                 "fitted": self.fitted.to(torch.uint8)}  # fmt: skip
        if self.has_hidden:
            state.update(hidden_weight=self.hidden_weight, hidden_bias=self.hidden_bias,
                         out_weight=self.out_weight,
                         nonlinear=self.nonlinear.to(torch.uint8))  # fmt: skip
        return state

    def fingerprint(self) -> str:
        """SHA-256 of the verifier's weights, standardisation and config: what a stop criterion
        fitted on its parses records (``parse_threshold_verified.json``)."""
        digest = hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode())
        for t in self._tensors().values():
            t = t.detach().cpu().contiguous()
            digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
            digest.update(t.numpy().tobytes())
        return digest.hexdigest()

    def config(self) -> dict:
        out = {"format_version": 2 if self.has_hidden else 1,
               "categories": list(self.categories), "read_levels": list(self.read_levels),
               "top_k": self.top_k, "model_sha256": self.model_sha256}  # fmt: skip
        if self.levels_below:  # absent for a first stage: its fingerprint is unchanged
            out["levels_below"] = self.levels_below
        if self.first_stage_sha256 is not None:
            out["first_stage_sha256"] = self.first_stage_sha256
        if self.refine_masks:  # absent when False: earlier files' fingerprints are unchanged
            out["refine_masks"] = True
        if self.consensus is not None:  # likewise absent when None
            out["consensus"] = self.consensus
        if self.has_hidden:
            out["ensemble"], out["hidden"] = (
                int(self.hidden_weight.shape[1]),
                int(self.hidden_weight.shape[3]),
            )
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the weights (safetensors) with the config in its metadata, atomically."""
        from safetensors.torch import save_file

        state = self._tensors()
        meta = {_CONFIG_KEY: json.dumps(self.config())}
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> DescentVerifier:
        """Read a verifier written by :meth:`save`; clear errors for wrong or damaged files."""
        path = Path(path)
        meta, state = read_safetensors(path, what="descent verifier")
        if _CONFIG_KEY not in meta:
            raise ValueError(f"{path} is not a pyro_backpass DescentVerifier file (no config)")
        config = json.loads(meta[_CONFIG_KEY])
        version = config.get("format_version")
        if version not in _READS:
            raise ValueError(f"{path} has format version {version}; this version of "
                             f"pyro_backpass reads {list(_READS)}")  # fmt: skip
        need = ["weight", "mean", "scale", "fitted"] + (list(_HIDDEN) if version == 2 else [])
        missing = [k for k in need if k not in state]
        if missing:
            raise ValueError(f"{path}: missing tensors {missing}")
        hidden = {}
        if version == 2:
            hidden = {k: state[k] for k in _HIDDEN[:3]}
            hidden["nonlinear"] = state["nonlinear"].bool()
        return cls(categories=config["categories"], read_levels=config["read_levels"],
                   weight=state["weight"], mean=state["mean"], scale=state["scale"],
                   fitted=state["fitted"].bool(), top_k=int(config["top_k"]),
                   model_sha256=config.get("model_sha256"),
                   levels_below=int(config.get("levels_below", 0)),
                   first_stage_sha256=config.get("first_stage_sha256"),
                   refine_masks=bool(config.get("refine_masks", False)),
                   consensus=config.get("consensus"), **hidden)  # fmt: skip

    @classmethod
    def shipped(cls, *, lower: bool = False, refined: bool = False) -> DescentVerifier | None:
        """The verifier shipped in the package (fitted for ``GenerativeModel.default()``), or
        None if the package has none; ``lower``: the second stage's; ``refined``: the first
        stage fitted on CRF-refined masks that chooses by consensus (airplane only; issue #10's
        ``verified_consensus.py``)."""
        if lower and refined:
            raise ValueError("the refined verifier is a first stage: pass lower or refined")
        name = LOWER_VERIFIER_FILE if lower else REFINED_VERIFIER_FILE if refined else VERIFIER_FILE
        ref = resources.files("pyro_backpass").joinpath("weights", name)
        if not ref.is_file():
            return None
        with resources.as_file(ref) as p:
            return cls.load(p)

    def __repr__(self) -> str:
        nonlinear = [c for c, f in zip(self.categories, self.nonlinear.tolist(), strict=True)
                     if f]  # fmt: skip
        return (f"DescentVerifier(fitted={list(self.fitted_categories)}, "
                f"features={self.num_features}, read_levels={list(self.read_levels)}, "
                f"top_k={self.top_k}"
                + (f", levels_below={self.levels_below}" if self.levels_below else "")
                + (f", nonlinear={nonlinear}" if nonlinear else "")
                + (", refine_masks=True" if self.refine_masks else "")
                + (f", consensus={self.consensus:g}" if self.consensus is not None else "")
                + ")")  # fmt: skip
