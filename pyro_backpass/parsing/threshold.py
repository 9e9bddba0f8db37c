"""The stop criterion and its threshold: fitted on validation scenes by
``benchmarks/parse_threshold.py`` for the shipped model and shipped in
``pyro_backpass/weights/parse_threshold.json`` (with its provenance)."""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING, Any

from pyro_backpass.model.generative_model import backbone_fingerprint
from pyro_backpass.parsing.stop import StopCriterion

if TYPE_CHECKING:
    from pyro_backpass.model.generative_model import GenerativeModel

__all__ = ["THRESHOLD_FILE", "default_threshold", "model_fingerprint", "threshold_record"]

THRESHOLD_FILE = "parse_threshold.json"
#: For a model the shipped criterion was not fitted to: a hypothesis must explain its elements
#: better than background does (its log-likelihood ratio, the statistic, above 0).
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
    """``{"criterion", "threshold", "explain_away", "background"}`` for ``gm``: the shipped fit
    when ``gm`` is the model it was fitted to (same parameters), else the LLR statistic
    (:meth:`StopCriterion.llr`) with threshold 0, ``"unobserve"`` and the ``"profile"``
    background. A record without a ``stop_criterion`` thresholds the LLR."""
    record = threshold_record()
    if record is not None and record.get("model_sha256") == model_fingerprint(gm):
        out = {k: record[k] for k in ("threshold", "explain_away", "background")}
        crit = record.get("stop_criterion")
        out["criterion"] = StopCriterion.llr() if crit is None else StopCriterion.from_dict(crit)
        return out
    return {"criterion": StopCriterion.llr(), "threshold": FALLBACK_THRESHOLD,
            "explain_away": "unobserve", "background": "profile"}  # fmt: skip
