import itertools

import pytest
import torch

from pyro_backpass import GenerativeModel, exact_map, greedy_map, joint_states, log_joint, sample


def brute_force(gm, bu, b):
    """Score every joint assignment with log_joint (batched over assignments), per image."""
    sites, sizes = gm.sites, gm.site_sizes
    combos = list(itertools.product(*[range(sizes[s]) for s in sites]))
    best = []
    for i in range(b):
        n = len(combos)
        rep = {k: v[i : i + 1].expand(n, *v.shape[1:]) for k, v in bu.items()}
        table = torch.tensor(combos)  # (n, sites)
        assignment = {s: table[:, j] for j, s in enumerate(sites)}
        with torch.no_grad():
            scores = log_joint(gm, rep, assignment)
        j = int(scores.argmax())
        best.append((dict(zip(sites, combos[j], strict=True)), float(scores[j])))
    return best


@pytest.mark.parametrize(
    "cfg, size, k, ncat",
    [([2], 6, 2, 2), ([2, "M"], 6, 2, 1), ([2], 5, 3, 1)],
)
def test_exact_equals_brute_force_and_is_never_below_greedy(cfg, size, k, ncat):
    gm = GenerativeModel.random(cfg, num_components=k, num_categories=ncat, image_size=size)
    s = sample(gm, 2, observe=True, seed=5)
    # Weak evidence: extra noise on every level makes greedy and exact differ more often.
    bu = {n: x + 0.5 * torch.randn_like(x) for n, x in s.bu.items()}
    exact = exact_map(gm, bu)
    greedy = greedy_map(gm, bu)
    for i, (assignment, score) in enumerate(brute_force(gm, bu, 2)):
        assert exact.log_joint[i].item() == pytest.approx(score, rel=1e-5, abs=1e-3)
        got = {s_: int(v[i]) for s_, v in exact.assignment.items()}
        # Same assignment, or a tie in score.
        if got != assignment:
            assert log_joint(gm, {n: x[i : i + 1] for n, x in bu.items()}, got).item() == (
                pytest.approx(score, rel=1e-5)
            )
    assert (exact.log_joint >= greedy.log_joint - 1e-3).all()
    torch.testing.assert_close(exact.log_joint, log_joint(gm, bu, exact.assignment).detach())


# The time-based "this will be slow" warning can fire on a loaded machine; it is tested on its own.
@pytest.mark.filterwarnings("ignore:exact_map.*joint states per image:RuntimeWarning")
def test_options_and_modes_against_brute_force():
    """Each mode is the best completion of one top-level choice, found by brute force."""
    gm = GenerativeModel.random([2, "M"], num_components=2, num_categories=2, image_size=6)
    s = sample(gm, 2, observe=True, seed=6)
    bu = {n: x + 0.3 * torch.randn_like(x) for n, x in s.bu.items()}
    r = exact_map(gm, bu, category=1, clamp={"gamma_image": 1}, top_k=3)
    assert r.assignment["category"].tolist() == [1, 1]
    assert r.assignment["gamma_image"].tolist() == [1, 1]
    sites, sizes = gm.sites, gm.site_sizes
    combos = [c for c in itertools.product(*[range(sizes[x]) for x in sites])
              if c[0] == 1 and c[sites.index("gamma_image")] == 1]  # fmt: skip
    table = torch.tensor(combos)
    for i in range(2):
        rep = {k: v[i : i + 1].expand(len(combos), *v.shape[1:]) for k, v in bu.items()}
        with torch.no_grad():
            scores = log_joint(gm, rep, {x: table[:, j] for j, x in enumerate(sites)})
        best_per_top: dict = {}
        for combo, score in zip(combos, scores.tolist(), strict=True):
            key = combo[:3]
            best_per_top[key] = max(best_per_top.get(key, -float("inf")), score)
        expect = sorted(best_per_top.values(), reverse=True)[:3]
        got = [m[1] for m in r.modes[i]]
        assert got == pytest.approx(expect, rel=1e-5)
        assert got[0] == pytest.approx(r.log_joint[i].item())
    with pytest.raises(ValueError, match="top_k"):
        exact_map(gm, bu, category=1, clamp={"gamma_pool1": 0, "delta_pool1": 3}, top_k=2)


def test_size_limit_admits_a_million_states_at_the_default_image_size():
    from pyro_backpass import DEFAULT_SIZE
    from pyro_backpass.inference.exact import DEFAULT_MAX_MEMORY, chunk_bytes

    gm = GenerativeModel.random([8, "M", 16, "M"], num_components=5, num_categories=2,
                                image_size=DEFAULT_SIZE)  # fmt: skip
    assert joint_states(gm) >= 10**6
    assert chunk_bytes(gm, set(), 1) <= DEFAULT_MAX_MEMORY


def test_size_limit_is_a_clear_error():
    gm = GenerativeModel.random([2, "M", 2, "M"], num_components=5, num_categories=1,
                                image_size=16)  # fmt: skip
    assert joint_states(gm) > 10**5
    bu = {"image": torch.rand(1, 3, 16, 16)}
    with pytest.raises(MemoryError, match="joint states per image"):
        exact_map(gm, bu, max_memory_bytes=1000)


def test_second_order_ngram_prior_per_call_matches_brute_force():
    """Another n-gram order, passed per call: γ_image | (γ_pool1, γ_conv1_1)."""
    from pyro_backpass import NGramPrior

    gm = GenerativeModel.random([2, "M"], num_components=2, num_categories=1, image_size=6)
    table = torch.tensor([[[0.9, 0.1], [0.2, 0.8]], [[0.5, 0.5], [0.05, 0.95]]])
    priors = {"gamma_image": NGramPrior(table, parents=["gamma_conv1_1", "gamma_pool1"])}
    s = sample(gm, 2, observe=True, seed=3, priors=priors)
    bu = {n: x + 0.3 * torch.randn_like(x) for n, x in s.bu.items()}
    exact = exact_map(gm, bu, priors=priors)
    greedy = greedy_map(gm, bu, priors=priors)
    assert (exact.log_joint >= greedy.log_joint - 1e-3).all()
    gm.priors["gamma_image"] = priors["gamma_image"]  # brute force scores with the model's own
    for i, (_, score) in enumerate(brute_force(gm, bu, 2)):
        assert exact.log_joint[i].item() == pytest.approx(score, rel=1e-5, abs=1e-3)


def test_progress_bar_counts_the_chunks(capsys):
    gm = GenerativeModel.random([2, "M"], num_components=2, num_categories=2, image_size=4)
    s = sample(gm, 1, observe=True, seed=0)
    clamp = {"category": 0, "gamma_pool1": 1}
    exact_map(gm, s.bu, clamp=clamp, progress=True)
    err = capsys.readouterr().err
    assert "exact_map:" in err and "/25 " in err  # one chunk per δ_pool1 (25)
    exact_map(gm, s.bu, clamp=clamp)  # few states: no bar by default
    assert "exact_map" not in capsys.readouterr().err
