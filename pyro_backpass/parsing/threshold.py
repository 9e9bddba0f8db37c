"""The stop criterion's threshold: fitted on validation scenes by
``benchmarks/parse_threshold.py`` for the shipped model and shipped in
``pyro_backpass/weights/parse_threshold.json`` (with its provenance)."""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING, Any

from pyro_backpass.model.generative_model import backbone_fingerprint

if TYPE_CHECKING:
    from pyro_backpass.model.generative_model import GenerativeModel

__all__ = ["THRESHOLD_FILE", "default_threshold", "model_fingerprint", "threshold_record"]

THRESHOLD_FILE = "parse_threshold.json"
#: For a model the shipped threshold was not fitted to: a hypothesis must explain its elements
#: better than background does (a log-likelihood ratio above 0).
FALLBACK_THRESHOLD = 0.0


def model_fingerprint(gm: GenerativeModel) -> str:
    """SHA-256 of the generative model's parameters and buffers (not its backbone's)."""
    return backbone_fingerprint(gm)


def threshold_record() -> dict[str, Any] | None:
    """The shipped record (threshold, explain-away choice, provenance), or None if absent."""
    ref = resources.files("pyro_backpass").joinpath("weights", THRESHOLD_FILE)
    if not ref.is_file():
        return None
    return json.loads(ref.read_text())


def default_threshold(gm: GenerativeModel) -> dict[str, Any]:
    """``{"threshold", "explain_away", "background"}`` for ``gm``: the shipped fit when ``gm``
    is the model it was fitted to (same parameters), else threshold 0 with ``"unobserve"`` and
    the ``"profile"`` background."""
    record = threshold_record()
    if record is not None and record.get("model_sha256") == model_fingerprint(gm):
        return {k: record[k] for k in ("threshold", "explain_away", "background")}
    return {"threshold": FALLBACK_THRESHOLD, "explain_away": "unobserve", "background": "profile"}
