"""A learned choice among completed descents (issue #10): which of greedy's top-k hypotheses is
an object of the category, not clutter.

The model's own score ranks the true top-level hypothesis of an airplane in clutter about 14th
of 500, yet completing the best few descents finds one that covers the airplane in most scenes.
A :class:`DescentVerifier` re-scores those completed descents: a linear function, one weight
vector per category, of each descent's features (computed by
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
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch

from pyro_backpass.files import atomic_write, read_safetensors

__all__ = ["DescentVerifier", "VERIFIER_FILE"]

VERIFIER_FILE = "descent_verifier.safetensors"
_CONFIG_KEY = "pyro_backpass.descent_verifier"
FORMAT_VERSION = 1


class DescentVerifier:
    """Per-category linear scores of completed descents' features.

    :param categories: the model's category names, in its order.
    :param read_levels: backbone levels whose activations of the claimed region are features.
    :param weight: ``(N, F)`` one weight vector per category.
    :param mean, scale: ``(N, F)`` the features' standardisation per category.
    :param fitted: ``(N,)`` bool: which categories have fitted weights; scoring another raises.
    :param top_k: how many of greedy's best top-level hypotheses are completed and re-scored.
    :param model_sha256: fingerprint of the generative model it was fitted for (None: unknown).
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
        self.top_k = top_k
        self.model_sha256 = model_sha256

    @property
    def num_features(self) -> int:
        return self.weight.shape[1]

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
        x = (features.to(self.weight) - self.mean[category]) / self.scale[category]
        return x @ self.weight[category]

    def fingerprint(self) -> str:
        """SHA-256 of the verifier's weights, standardisation and config: what a stop criterion
        fitted on its parses records (``parse_threshold_verified.json``)."""
        digest = hashlib.sha256(json.dumps(self.config(), sort_keys=True).encode())
        for t in (self.weight, self.mean, self.scale, self.fitted.to(torch.uint8)):
            t = t.detach().cpu().contiguous()
            digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
            digest.update(t.numpy().tobytes())
        return digest.hexdigest()

    def config(self) -> dict:
        return {"format_version": FORMAT_VERSION, "categories": list(self.categories),
                "read_levels": list(self.read_levels), "top_k": self.top_k,
                "model_sha256": self.model_sha256}  # fmt: skip

    def save(self, path: str | os.PathLike) -> Path:
        """Write the weights (safetensors) with the config in its metadata, atomically."""
        from safetensors.torch import save_file

        state = {"weight": self.weight, "mean": self.mean, "scale": self.scale,
                 "fitted": self.fitted.to(torch.uint8)}  # fmt: skip
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
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} has format version {config.get('format_version')}; this "
                             f"version of pyro_backpass reads {FORMAT_VERSION}")  # fmt: skip
        missing = [k for k in ("weight", "mean", "scale", "fitted") if k not in state]
        if missing:
            raise ValueError(f"{path}: missing tensors {missing}")
        return cls(categories=config["categories"], read_levels=config["read_levels"],
                   weight=state["weight"], mean=state["mean"], scale=state["scale"],
                   fitted=state["fitted"].bool(), top_k=int(config["top_k"]),
                   model_sha256=config.get("model_sha256"))  # fmt: skip

    @classmethod
    def shipped(cls) -> DescentVerifier | None:
        """The verifier shipped in the package (fitted for ``GenerativeModel.default()``), or
        None if the package has none."""
        ref = resources.files("pyro_backpass").joinpath("weights", VERIFIER_FILE)
        if not ref.is_file():
            return None
        with resources.as_file(ref) as p:
            return cls.load(p)

    def __repr__(self) -> str:
        return (f"DescentVerifier(fitted={list(self.fitted_categories)}, "
                f"features={self.num_features}, read_levels={list(self.read_levels)}, "
                f"top_k={self.top_k})")  # fmt: skip
