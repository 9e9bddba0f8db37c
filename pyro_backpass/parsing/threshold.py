"""The stop criterion and its threshold: fitted on validation scenes by
``benchmarks/parse_threshold.py`` for the shipped model and shipped in
``pyro_backpass/weights/parse_threshold.json`` (with its provenance). A parse with the shipped
descent verifier (``run_parse(..., verifier=)``) makes other steps than the plain parse; their
criterion, fitted on verified parses of the same validation scenes
(``parse_threshold.py --verifier-top-k K``), is ``parse_threshold_verified.json``; a verified
parse whose heads a :class:`~pyro_backpass.parsing.HeadChoice` chooses
(``run_parse(..., choose=)``) keeps fewer, larger heads, and its criterion, fitted on such
parses (``parse_threshold.py --verifier-top-k K --choose [--refine]``), is
``parse_threshold_choice.json``."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import TYPE_CHECKING, Any

from pyro_backpass.model.generative_model import backbone_fingerprint
from pyro_backpass.parsing.stop import StopCriterion

if TYPE_CHECKING:
    from pyro_backpass.model.descent_verifier import DescentVerifier
    from pyro_backpass.model.generative_model import GenerativeModel
    from pyro_backpass.parsing.head_choice import HeadChoice

__all__ = [
    "CHOICE_THRESHOLD_FILE",
    "THRESHOLD_FILE",
    "VERIFIED_THRESHOLD_FILE",
    "default_threshold",
    "model_fingerprint",
    "record_fingerprint",
    "threshold_record",
]

THRESHOLD_FILE = "parse_threshold.json"
VERIFIED_THRESHOLD_FILE = "parse_threshold_verified.json"
CHOICE_THRESHOLD_FILE = "parse_threshold_choice.json"
#: For a model the shipped criterion was not fitted to: a hypothesis must explain its elements
#: better than background does (its log-likelihood ratio, the statistic, above 0).
FALLBACK_THRESHOLD = 0.0


def model_fingerprint(gm: GenerativeModel) -> str:
    """SHA-256 of the generative model's parameters and buffers (not its backbone's)."""
    return backbone_fingerprint(gm)


def threshold_record(*, verified: bool = False, choice: bool = False) -> dict[str, Any] | None:
    """The shipped record (threshold, explain-away choice, provenance), or None if absent;
    ``verified``: the record fitted on parses with the shipped descent verifier; ``choice``:
    on verified parses whose heads the shipped :class:`HeadChoice` chose."""
    if verified and choice:
        raise ValueError("threshold_record: verified or choice, not both")
    name = (CHOICE_THRESHOLD_FILE if choice else VERIFIED_THRESHOLD_FILE if verified
            else THRESHOLD_FILE)  # fmt: skip
    ref = resources.files("pyro_backpass").joinpath("weights", name)
    if not ref.is_file():
        return None
    return json.loads(ref.read_text())


def default_threshold(
    gm: GenerativeModel,
    *,
    verifier: DescentVerifier | None = None,
    top_k: int | None = None,
    choose: HeadChoice | None = None,
    refine_masks: bool = False,
) -> dict[str, Any]:
    """``{"criterion", "threshold", "explain_away", "background", "fitted_on"}`` for ``gm``.

    With a ``verifier`` and a ``choose``: the fit on verified parses whose heads that choice
    chose (``fitted_on="choice"``) when all that it was fitted with is what the parse uses —
    the same model parameters, verifier weights, ``top_k``, head choice and ``refine_masks``.
    With a ``verifier`` (and no such fit): the fit on verified parses (``"verified"``) under
    the same conditions less the choice, and the plain fit that ordered its steps still
    shipped. Otherwise, and without a verifier: the fit on plain parses when ``gm`` is its model
    (``"plain"``); else the LLR statistic (:meth:`StopCriterion.llr`) with threshold 0,
    ``"unobserve"`` and the ``"profile"`` background (``"fallback"``). A record without a
    ``stop_criterion`` thresholds the LLR."""
    sha = model_fingerprint(gm)
    if verifier is not None and choose is not None:
        record = threshold_record(choice=True)
        if (record is not None and record.get("model_sha256") == sha
                and record.get("verifier_sha256") == verifier.fingerprint()
                and record.get("verifier_top_k") == top_k
                and record.get("head_choice_sha256") == choose.fingerprint()
                and record.get("refine_masks") == bool(refine_masks)):  # fmt: skip
            return _from_record(record, fitted_on="choice")
    plain = threshold_record()
    if plain is not None and plain.get("model_sha256") != sha:
        plain = None
    if verifier is not None and plain is not None:
        record = threshold_record(verified=True)
        if (record is not None and record.get("model_sha256") == sha
                and record.get("verifier_sha256") == verifier.fingerprint()
                and record.get("verifier_top_k") == top_k
                and record.get("plain_record_sha256") == record_fingerprint(plain)):  # fmt: skip
            return _from_record(record, fitted_on="verified")
    if plain is not None:
        return _from_record(plain, fitted_on="plain")
    return {"criterion": StopCriterion.llr(), "threshold": FALLBACK_THRESHOLD,
            "explain_away": "unobserve", "background": "profile",
            "fitted_on": "fallback"}  # fmt: skip


def record_fingerprint(record: dict[str, Any]) -> str:
    """SHA-256 of a record's criterion, threshold and explain-away choice (what orders and stops
    a parse's steps)."""
    keys = ("stop_criterion", "threshold", "explain_away", "background", "model_sha256")
    text = json.dumps({k: record.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _from_record(record: dict[str, Any], *, fitted_on: str) -> dict[str, Any]:
    out = {k: record[k] for k in ("threshold", "explain_away", "background")}
    crit = record.get("stop_criterion")
    out["criterion"] = StopCriterion.llr() if crit is None else StopCriterion.from_dict(crit)
    out["fitted_on"] = fitted_on
    return out
