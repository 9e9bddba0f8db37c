"""hypothesis_scores against the plain formula: closed_form_td on every shifted copy, in a loop."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_backpass import closed_form_td
from pyro_backpass.inference.hypotheses import hypothesis_scores as scores_with
from pyro_backpass.model.observation import closed_form_constants
from pyro_backpass.model.top_down import offset_grid, shift_all
from tests.oracles import shift_loop


def _oracle(bu, phi, offsets, observed, **kw):
    """Per image, hypothesis and offset: shift φ by index loops, closed form, sum (float64)."""
    b, t, d = bu.shape[0], phi.shape[1], len(offsets)
    out = torch.empty(b, t, d, dtype=torch.float64)
    for i in range(b):
        for h in range(t):
            p = phi[min(i, phi.shape[0] - 1), h].double()
            for n, (dy, dx) in enumerate(offsets.tolist()):
                obs = None if observed is None else observed[i]
                _, s = closed_form_td(bu[i].double(), shift_loop(p, dy, dx), observed=obs, **kw)
                out[i, h, n] = s.sum()
    return out


def hypothesis_scores(bu, phi, offsets, *, observed=None, chunk_elements=2**22, **kw):
    """The scoring under test, with the observation parameters as keywords."""
    c = closed_form_constants(**kw, like=phi)
    return scores_with(c, bu, phi, offsets, observed=observed, chunk_elements=chunk_elements)


def _kw(c, gen, *, threshold=0.5):
    return dict(
        threshold=threshold,
        background=0.1,
        scale_td=0.2,
        scale_on=(0.2 + 0.3 * torch.rand(c, 1, 1, generator=gen)).double(),
        scale_off=0.35,
    )


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    radius=st.integers(0, 2),
    shared=st.booleans(),
    masked=st.booleans(),
    threshold=st.sampled_from([0.5, 0.0, -0.3, 1.2]),
    chunk=st.sampled_from([1, 50, 2**22]),
)
def test_matches_the_plain_closed_form_on_every_shift(
    seed, radius, shared, masked, threshold, chunk
):
    gen = torch.Generator().manual_seed(seed)
    b, t, c, h, w = 3, 4, 2, 5, 6
    kw = _kw(c, gen, threshold=threshold)
    # Values around the threshold, exact zeros in φ (ReLU) and in the image (background).
    bu = (1.5 * torch.randn(b, c, h, w, generator=gen)).relu().double()
    phi = (1.5 * torch.randn(1 if shared else b, t, c, h, w, generator=gen)).relu().double()
    offsets = torch.tensor(offset_grid(radius))
    observed = torch.rand(b, 1, h, w, generator=gen) > 0.3 if masked else None
    got = hypothesis_scores(bu, phi, offsets, observed=observed, chunk_elements=chunk, **kw)
    want = _oracle(bu, phi, offsets, observed, **kw)
    assert got.shape == (b, t, len(offsets))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-8)


def test_float32_keeps_the_ranking_of_the_plain_formula():
    gen = torch.Generator().manual_seed(3)
    b, t, c, h, w = 4, 6, 4, 8, 8
    kw = _kw(c, gen)
    kw["scale_on"] = kw["scale_on"].float()
    bu = (1.2 * torch.randn(b, c, h, w, generator=gen)).relu()
    phi = torch.randn(1, t, c, h, w, generator=gen).relu()
    offsets = torch.tensor(offset_grid(2))
    got = hypothesis_scores(bu, phi, offsets, **kw)
    want = _oracle(bu, phi, offsets, None, **kw)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-3)
    assert torch.equal(got.reshape(b, -1).argmax(-1), want.reshape(b, -1).argmax(-1))


def test_unobserved_level_scores_every_hypothesis_alike():
    phi = torch.rand(2, 3, 2, 4, 4)
    got = hypothesis_scores(
        None, phi, torch.tensor(offset_grid(1)), threshold=0.5, background=0.0, scale_td=0.1,
        scale_on=0.3, scale_off=0.3,
    )  # fmt: skip
    expect = 32 * torch.distributions.Normal(0.0, 0.1).log_prob(torch.tensor(0.0))
    assert got.shape == (2, 3, 9)
    torch.testing.assert_close(got, expect.expand(2, 3, 9))


def test_repeated_calls_do_not_share_results():
    """The scratch buffer is reused: a second call must not change the first's result."""
    gen = torch.Generator().manual_seed(0)
    kw = _kw(2, gen)
    bu = torch.rand(2, 2, 4, 4, generator=gen).double()
    phi = torch.rand(1, 3, 2, 4, 4, generator=gen).double()
    offsets = torch.tensor(offset_grid(1))
    first = hypothesis_scores(bu, phi, offsets, **kw)
    kept = first.clone()
    hypothesis_scores(bu * 2, phi, offsets, **kw)
    torch.testing.assert_close(first, kept, rtol=0, atol=0)


@pytest.mark.parametrize("categories", [None, [0, 2], [1]], ids=["all", "two-of-three", "one"])
def test_greedy_top_level_scores_are_prior_plus_plain_data_score(categories):
    """greedy_map's top-level scores over every (category, γ, δ), against a loop; with
    ``categories`` (a clamp), the others are not scored and are −inf."""
    from pyro_backpass import GenerativeModel, sample
    from pyro_backpass.inference.greedy import top_level_scores

    gm = GenerativeModel.random([3, "M"], num_components=2, num_categories=3, image_size=8)
    s = sample(gm, 2, observe=True, seed=1)
    top = gm.hidden_levels[-1]
    step, obs = gm.steps[top], gm.observations[top]
    priors = gm.resolve_priors(None)
    chosen = None if categories is None else torch.tensor(categories)
    got, _ = top_level_scores(
        gm, dict(s.bu), {}, priors, batch=2, chunk_elements=2**22, constants=gm.constants(top),
        categories=chosen,
    )  # (B, N, K, D)  # fmt: skip
    templates = step.weight.relu().reshape(1, -1, *step.out.shape)
    kw = dict(threshold=obs.threshold, background=obs.background, scale_td=step.scale_td,
              scale_on=obs.scale_on, scale_off=obs.scale_off)  # fmt: skip
    want = _oracle(s.bu[top], templates, step.offsets, None, **kw).reshape(got.shape)
    lp_c = priors["category"].log_probs()
    lp_g = priors[f"gamma_{top}"].log_probs()  # (N, K): γ_top given the category
    lp_d = priors[f"delta_{top}"].log_probs()
    for c, g, d in torch.cartesian_prod(*(torch.arange(n) for n in got.shape[1:])).tolist():
        want[:, c, g, d] += float(lp_c[c] + lp_g[c, g] + lp_d[d])
    if categories is not None:
        others = [c for c in range(3) if c not in categories]
        want[:, others] = -torch.inf
        assert torch.isneginf(got[:, others]).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-3)


def test_gradients_flow_and_match_the_plain_formula():
    """With gradients on, the scratch buffers are bypassed: same values, autograd works."""
    gen = torch.Generator().manual_seed(5)
    kw = _kw(2, gen)
    bu = torch.rand(2, 2, 4, 4, generator=gen).double()
    phi = torch.rand(1, 3, 2, 4, 4, generator=gen).double().requires_grad_()
    offsets = torch.tensor(offset_grid(1))
    got = hypothesis_scores(bu, phi, offsets, **kw)
    with torch.no_grad():
        torch.testing.assert_close(got, hypothesis_scores(bu, phi, offsets, **kw))
    (grad,) = torch.autograd.grad(got.sum(), phi)
    plain = closed_form_td(bu[:, None, None], shift_all(phi, offsets), **kw)[1].sum()
    (want,) = torch.autograd.grad(plain, phi)
    torch.testing.assert_close(grad, want)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-templates", "per-image"])
def test_an_all_zero_phi_ties_exactly_at_every_offset(shared):
    """A dead component (φ = 0) scores the same at every offset, to the bit, on both paths,
    so ties go to the lowest offset whatever else is in the batch."""
    gen = torch.Generator().manual_seed(7)
    kw = _kw(2, gen)
    kw["scale_on"] = kw["scale_on"].float()
    bu = (1.3 * torch.randn(3, 2, 6, 6, generator=gen)).relu()
    phi = torch.rand(1 if shared else 3, 4, 2, 6, 6, generator=gen)
    phi[:, 2] = 0.0
    got = hypothesis_scores(bu, phi, torch.tensor(offset_grid(1)), **kw)  # (B, T, D)
    assert (got[:, 2] == got[:, 2, :1]).all()


def test_values_under_unobserved_elements_do_not_matter():
    gen = torch.Generator().manual_seed(8)
    kw = _kw(2, gen)
    bu = torch.rand(2, 2, 5, 5, generator=gen).double()
    phi = torch.rand(1, 3, 2, 5, 5, generator=gen).double()
    observed = torch.rand(2, 1, 5, 5, generator=gen) > 0.4
    offsets = torch.tensor(offset_grid(1))
    huge = torch.where(observed, bu, torch.full_like(bu, 1e300))
    for chunk in (2**22, 60):  # both paths
        a = hypothesis_scores(bu, phi, offsets, observed=observed, chunk_elements=chunk, **kw)
        b = hypothesis_scores(huge, phi, offsets, observed=observed, chunk_elements=chunk, **kw)
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "offsets",
    [[(0, 0)], [(1, -2)], [(0, 2), (-1, 1), (2, -2)], [(7, 0), (0, 0), (-3, -9)]],
    ids=["origin", "one-shift", "sparse", "off-the-map"],
)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-image"])
@pytest.mark.parametrize("chunk", [7, 40, 2**22], ids=["tiny-blocks", "small-blocks", "one"])
def test_any_offset_list_and_block_size_against_the_plain_formula(offsets, shared, chunk):
    """Every shape of level greedy meets (one offset at the origin or elsewhere, offset lists
    in any order, shifts that leave the map), in blocks of any size (cache-sized in use)."""
    gen = torch.Generator().manual_seed(len(offsets) + 10 * shared + chunk)
    b, t, c, h, w = 3, 4, 2, 5, 6
    kw = _kw(c, gen)
    bu = (1.5 * torch.randn(b, c, h, w, generator=gen)).relu().double()
    phi = (1.5 * torch.randn(1 if shared else b, t, c, h, w, generator=gen)).relu().double()
    offsets = torch.tensor(offsets)
    for observed in (None, torch.rand(b, c, h, w, generator=gen) > 0.3):
        got = hypothesis_scores(bu, phi, offsets, observed=observed, chunk_elements=chunk, **kw)
        want = _oracle(bu, phi, offsets, observed, **kw)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-8)


@pytest.mark.parametrize("chunk", [7, 2**22], ids=["tiny-blocks", "one-block"])
def test_an_all_zero_phi_ties_exactly_in_blocks_of_any_size(chunk):
    gen = torch.Generator().manual_seed(11)
    kw = _kw(2, gen)
    kw["scale_on"] = kw["scale_on"].float()
    bu = (1.3 * torch.randn(3, 2, 6, 6, generator=gen)).relu()
    phi = torch.rand(3, 4, 2, 6, 6, generator=gen)
    phi[:, 1] = 0.0
    got = hypothesis_scores(bu, phi, torch.tensor(offset_grid(2)), chunk_elements=chunk, **kw)
    assert (got[:, 1] == got[:, 1, :1]).all()
