"""Which stop criterion a parse gets (``default_threshold``): the fit on verified parses only
for the model *and* verifier it was fitted with, else the plain fit, else the fallback."""

from __future__ import annotations

import pytest
import torch

from pyro_backpass import DescentVerifier, GenerativeModel
from pyro_backpass.parsing import StopCriterion, default_threshold, model_fingerprint
from pyro_backpass.parsing import threshold as threshold_module


def _verifier(scale: float = 1.0) -> DescentVerifier:
    weight = torch.arange(6, dtype=torch.float64).reshape(2, 3) * scale
    return DescentVerifier(categories=["a", "b"], read_levels=["pool4"], weight=weight,
                           mean=torch.zeros(2, 3), scale=torch.ones(2, 3),
                           fitted=torch.tensor([True, False]), top_k=4)  # fmt: skip


def test_fingerprint_follows_the_weights_and_survives_a_round_trip(tmp_path):
    v = _verifier()
    assert DescentVerifier.load(v.save(tmp_path / "v.safetensors")).fingerprint() == v.fingerprint()
    assert _verifier(2.0).fingerprint() != v.fingerprint()
    w = _verifier()
    w.fitted = torch.tensor([True, True])
    assert w.fingerprint() != v.fingerprint()


@pytest.fixture
def gm():
    return GenerativeModel.random([4, "M"], num_components=2, num_categories=2, seed=0)


def _record(threshold: float, sha: str, **extra) -> dict:
    return {
        "threshold": threshold,
        "explain_away": "subtract",
        "background": "off",
        "stop_criterion": StopCriterion.llr().to_dict(),
        "model_sha256": sha,
        **extra,
    }


def test_verified_record_only_for_its_model_and_verifier(gm, monkeypatch):
    sha, v = model_fingerprint(gm), _verifier()
    records = {False: _record(1.5, sha), True: _record(-2.5, sha, verifier_sha256=v.fingerprint())}
    monkeypatch.setattr(
        threshold_module, "threshold_record", lambda *, verified=False: records[verified]
    )
    got = default_threshold(gm, verifier=v)
    assert (got["threshold"], got["fitted_on"]) == (-2.5, "verified")
    assert (got["explain_away"], got["background"]) == ("subtract", "off")
    got = default_threshold(gm)  # no verifier: the plain fit
    assert (got["threshold"], got["fitted_on"]) == (1.5, "plain")
    got = default_threshold(gm, verifier=_verifier(2.0))  # another verifier: the plain fit
    assert (got["threshold"], got["fitted_on"]) == (1.5, "plain")
    records[True] = _record(-2.5, "0" * 64, verifier_sha256=v.fingerprint())  # another model
    assert default_threshold(gm, verifier=v)["fitted_on"] == "plain"
    records[False] = _record(1.5, "0" * 64)
    got = default_threshold(gm, verifier=v)
    assert (got["threshold"], got["fitted_on"]) == (0.0, "fallback")
