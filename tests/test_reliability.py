"""Issue #12's QA list (tests/reliability_cases.py): every bad input gets the outcome it must
have — a clear one-line error, a warning, or documented handling — never a silent wrong
answer. The command-line cases are in tests/cli/test_arguments.py, the file cases (umask,
fsync, kills) in tests/test_files.py."""

import pytest
import torch

from tests.reliability_cases import CASES, run_case


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case):
    assert run_case(case) == case.kind


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_prior_assigned_after_to_cuda_is_moved():
    from pyro_backpass import CategoricalPrior, GenerativeModel, greedy_map, sample

    gm = GenerativeModel.random([4, "M"], num_components=3, num_categories=2, image_size=16)
    s = sample(gm, 2, observe=True, seed=0)
    expected = greedy_map(gm, s.bu, priors={"delta_pool1": CategoricalPrior(torch.arange(25.0))})
    gm.to("cuda")
    gm.priors["delta_pool1"] = CategoricalPrior(torch.arange(25.0))  # on the CPU
    result = greedy_map(gm, {k: v.cuda() for k, v in s.bu.items()})
    assert gm.priors["delta_pool1"].probs.device.type == "cuda"
    for site in gm.sites:
        assert torch.equal(result.assignment[site].cpu(), expected.assignment[site])
