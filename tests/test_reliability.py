"""Issue #12's QA list (tests/reliability_cases.py): every bad input gets the outcome it must
have — a clear one-line error, a warning, or documented handling — never a silent wrong
answer. The command-line cases are in tests/cli/test_arguments.py, the file cases (umask,
fsync, kills) in tests/test_files.py."""

import pytest

from tests.reliability_cases import CASES, run_case


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case):
    assert run_case(case) == case.kind


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)
