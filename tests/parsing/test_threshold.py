"""Which stop criterion a parse gets (``default_threshold``): the fit on parses whose heads a
HeadChoice chose only for the model, verifier, ``top_k``, choice and ``refine_masks`` it was made
with; the fit on verified parses only for the model, verifier, ``top_k`` and plain fit it was
made with; else the plain fit, else the fallback."""

from __future__ import annotations

import pytest
import torch

from pyro_backpass import DescentVerifier, GenerativeModel, HeadChoice
from pyro_backpass.parsing import (
    StopCriterion,
    default_threshold,
    model_fingerprint,
    record_fingerprint,
)
from pyro_backpass.parsing import threshold as threshold_module


def _verifier(factor: float = 1.0, **change) -> DescentVerifier:
    weight = torch.arange(6, dtype=torch.float64).reshape(2, 3) * factor
    kw = dict(categories=["a", "b"], read_levels=["pool4"], weight=weight,
              mean=torch.zeros(2, 3), scale=torch.ones(2, 3),
              fitted=torch.tensor([True, False]), top_k=4)  # fmt: skip
    return DescentVerifier(**{**kw, **change})


def test_fingerprint_follows_everything_that_scores_and_survives_a_round_trip(tmp_path):
    v = _verifier()
    assert DescentVerifier.load(v.save(tmp_path / "v.safetensors")).fingerprint() == v.fingerprint()
    others = [
        _verifier(2.0),
        _verifier(fitted=torch.tensor([True, True])),
        _verifier(mean=torch.full((2, 3), 0.5)),
        _verifier(scale=torch.full((2, 3), 2.0)),
        _verifier(top_k=5),
        _verifier(model_sha256="0" * 64),
        _verifier(read_levels=["pool3"]),
    ]
    prints = {v.fingerprint(), *(o.fingerprint() for o in others)}
    assert len(prints) == len(others) + 1


@pytest.fixture
def gm():
    return GenerativeModel.random([4, "M"], num_components=2, num_categories=2, seed=0)


def _record(threshold: float, sha: str, **extra) -> dict:
    crit = StopCriterion.llr().to_dict()
    return {"threshold": threshold, "explain_away": "subtract", "background": "off",
            "stop_criterion": crit, "model_sha256": sha, **extra}  # fmt: skip


def test_verified_record_only_for_what_it_was_fitted_with(gm, monkeypatch):
    sha, v = model_fingerprint(gm), _verifier()
    plain = _record(1.5, sha)
    verified = _record(-2.5, sha, verifier_sha256=v.fingerprint(), verifier_top_k=100,
                       plain_record_sha256=record_fingerprint(plain))  # fmt: skip
    records = {False: plain, True: verified}
    monkeypatch.setattr(threshold_module, "threshold_record",
                        lambda *, verified=False, choice=False: records[verified])  # fmt: skip
    got = default_threshold(gm, verifier=v, top_k=100)
    assert (got["threshold"], got["fitted_on"]) == (-2.5, "verified")
    assert (got["explain_away"], got["background"]) == ("subtract", "off")
    for kw in ({}, {"verifier": v, "top_k": 32}, {"verifier": _verifier(2.0), "top_k": 100}):
        got = default_threshold(gm, **kw)  # no verifier, other top_k, other verifier: plain
        assert (got["threshold"], got["fitted_on"]) == (1.5, "plain")
    records[False] = _record(1.0, sha)  # the plain fit that ordered the steps was refitted
    assert default_threshold(gm, verifier=v, top_k=100)["fitted_on"] == "plain"
    records[False] = plain
    records[True] = {**records[True], "model_sha256": "0" * 64}  # another model
    assert default_threshold(gm, verifier=v, top_k=100)["fitted_on"] == "plain"
    records[False] = _record(1.5, "0" * 64)
    got = default_threshold(gm, verifier=v, top_k=100)
    assert (got["threshold"], got["fitted_on"]) == (0.0, "fallback")


def _choice(bias: float = 0.0) -> HeadChoice:
    return HeadChoice(("a", "b"), (1.0, bias, 0.0, 0.0, 0.5), (0.0,) * 5, (1.0,) * 5)


def test_choice_record_only_for_what_it_was_fitted_with(gm, monkeypatch):
    sha, v, h = model_fingerprint(gm), _verifier(), _choice()
    plain = _record(1.5, sha)
    verified = _record(-2.5, sha, verifier_sha256=v.fingerprint(), verifier_top_k=100,
                       plain_record_sha256=record_fingerprint(plain))  # fmt: skip
    choice = _record(-4.0, sha, verifier_sha256=v.fingerprint(), verifier_top_k=100,
                     head_choice_sha256=h.fingerprint(), refine_masks=True)  # fmt: skip
    records = {"plain": plain, "verified": verified, "choice": choice}

    def record(*, verified=False, choice=False):
        return records["choice" if choice else "verified" if verified else "plain"]

    monkeypatch.setattr(threshold_module, "threshold_record", record)
    got = default_threshold(gm, verifier=v, top_k=100, choose=h, refine_masks=True)
    assert (got["threshold"], got["fitted_on"]) == (-4.0, "choice")
    assert (got["explain_away"], got["background"]) == ("subtract", "off")
    # Another choice, no refinement, another top_k or verifier, no choice: not the choice fit.
    for kw in ({"choose": _choice(0.5), "refine_masks": True, "top_k": 100, "verifier": v},
               {"choose": h, "top_k": 100, "verifier": v},
               {"choose": h, "refine_masks": True, "top_k": 32, "verifier": v},
               {"choose": h, "refine_masks": True, "top_k": 100, "verifier": _verifier(2.0)},
               {"refine_masks": True, "top_k": 100, "verifier": v}):  # fmt: skip
        assert default_threshold(gm, **kw)["fitted_on"] != "choice"
    assert default_threshold(gm, choose=h, refine_masks=True)["fitted_on"] == "plain"
    records["choice"] = {**choice, "model_sha256": "0" * 64}  # another model: the verified fit
    got = default_threshold(gm, verifier=v, top_k=100, choose=h, refine_masks=True)
    assert (got["threshold"], got["fitted_on"]) == (-2.5, "verified")
    assert h.fingerprint() == HeadChoice.from_dict(h.to_dict()).fingerprint()


def test_shipped_files_agree():
    """The shipped verifier, model and plain fit are those the verified fit was made with: a
    verifier or plain criterion shipped without refitting it fails here."""
    gm, v = GenerativeModel.default(), DescentVerifier.shipped()
    assert default_threshold(gm, verifier=v, top_k=100)["fitted_on"] == "verified"
    assert default_threshold(gm)["fitted_on"] == "plain"
    got = default_threshold(gm, verifier=v, top_k=100, choose=HeadChoice.shipped(),
                            refine_masks=True)  # fmt: skip
    assert got["fitted_on"] == "choice"
