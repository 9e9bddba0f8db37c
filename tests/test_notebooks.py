"""Every notebook runs top to bottom in its smoke setting."""

import fcntl
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.fixture
def one_kernel_at_a_time(tmp_path_factory):
    """Under pytest-xdist, one notebook kernel starts at a time across the workers (a kernel's
    ports are chosen free, then bound: two starting together can pick the same)."""
    lock = tmp_path_factory.getbasetemp().parent / "notebook-kernels.lock"
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch, one_kernel_at_a_time):
    monkeypatch.setenv("PYRO_BACKPASS_SMOKE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={
        "metadata": {"path": str(path.parent)}}).execute()  # fmt: skip
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]  # fmt: skip
    assert not errors
    assert os.environ["PYRO_BACKPASS_SMOKE"] == "1"
