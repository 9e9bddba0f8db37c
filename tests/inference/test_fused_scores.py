"""The opt-in compiled scores (PYRO_BACKPASS_COMPILE=1) against the plain formula.

Each distinct level shape compiles once (seconds), so the shapes here are few and shared.
"""

import pytest
import torch

from pyro_backpass import GenerativeModel, closed_form_td, greedy_map, sample
from pyro_backpass.inference import fused_scores as fused
from pyro_backpass.model.observation import closed_form_constants
from pyro_backpass.model.top_down import offset_grid
from tests.inference.test_hypotheses import _kw, _oracle, hypothesis_scores


@pytest.fixture
def compiled(monkeypatch):
    monkeypatch.setenv("PYRO_BACKPASS_COMPILE", "1")
    assert fused.compile_enabled()


@pytest.mark.parametrize(
    "offsets, shared",
    [(offset_grid(1), False), ([(0, 0)], False), ([(7, 0), (0, 0), (-1, 2)], True)],
    ids=["radius-1", "origin", "shared-off-the-map"],
)
def test_compiled_scores_match_the_plain_formula(compiled, offsets, shared):
    gen = torch.Generator().manual_seed(len(offsets))
    b, t, c, h, w = 3, 4, 2, 5, 6
    kw = _kw(c, gen)
    bu = (1.5 * torch.randn(b, c, h, w, generator=gen)).relu().double()
    phi = (1.5 * torch.randn(1 if shared else b, t, c, h, w, generator=gen)).relu().double()
    phi[:, 1] = 0.0  # a dead component
    offsets = torch.tensor(offsets)
    for observed in (None, torch.rand(b, c, h, w, generator=gen) > 0.3):
        with torch.no_grad():
            got = hypothesis_scores(bu, phi, offsets, observed=observed, **kw)
        torch.testing.assert_close(got, _oracle(bu, phi, offsets, observed, **kw),
                                   rtol=1e-9, atol=1e-8)  # fmt: skip
        assert (got[:, 1] == got[:, 1, :1]).all()  # the dead component ties to the bit
    assert not fused._failed


def test_compiled_closed_form_matches_the_eager_one(compiled):
    """The winner's closed form in one compiled loop: the same maximiser (the branch choice
    included) and the same score up to rounding, with and without an occlusion mask."""
    gen = torch.Generator().manual_seed(3)
    b, c, h, w = 3, 2, 5, 6
    kw = _kw(c, gen)
    bu = (1.5 * torch.randn(b, c, h, w, generator=gen)).relu().double()
    phi = (1.5 * torch.randn(b, c, h, w, generator=gen)).relu().double()
    consts = closed_form_constants(like=phi, **kw)
    for observed in (None, torch.rand(b, c, h, w, generator=gen) > 0.3):
        want_f, want_s = closed_form_td(bu, phi, observed=observed, **kw)
        got_f, got_s = fused.compiled_closed_form(consts, bu, phi, observed)
        torch.testing.assert_close(got_f, want_f, rtol=1e-12, atol=0)
        torch.testing.assert_close(got_s, want_s, rtol=1e-12, atol=1e-12)
    assert not fused._failed


@pytest.mark.slow
def test_greedy_with_compiled_scores_gives_the_eager_answer(monkeypatch):
    """Assignments equal, log-joints to 1e-5 relative (a minute of compiles: slow)."""
    gm = GenerativeModel.random([4, "M", 4], num_components=3, num_categories=2, image_size=8)
    s = sample(gm, 6, observe=True, seed=2)
    eager = greedy_map(gm, s.bu, top_k=2)
    monkeypatch.setenv("PYRO_BACKPASS_COMPILE", "1")
    got = greedy_map(gm, s.bu, top_k=2)
    assert not fused._failed
    for site, value in eager.assignment.items():
        assert torch.equal(got.assignment[site], value), site
    torch.testing.assert_close(got.log_joint, eager.log_joint, rtol=1e-5, atol=0)
