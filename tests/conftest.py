import matplotlib
import pyro
import pytest
import torch

matplotlib.use("Agg")


@pytest.fixture(autouse=True)
def _seed_and_validate():
    """Every test starts seeded, with an empty param store and Pyro validation on."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()
