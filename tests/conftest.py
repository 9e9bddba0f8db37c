import os

import matplotlib
import pyro
import pytest
import torch

matplotlib.use("Agg")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest-xdist worker per core: one torch thread each, so the workers
    # do not fight over the cores.
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # and the processes the tests start


@pytest.fixture(autouse=True)
def _seed_and_validate():
    """Every test starts seeded, with an empty param store and Pyro validation on."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()


@pytest.fixture
def one_thread():
    """One torch thread for the test (many small ops, e.g. parsing: one thread is faster than
    two on a shared machine); the count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
