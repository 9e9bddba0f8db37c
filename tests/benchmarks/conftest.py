import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch


def _smoke_model_env() -> str:
    """``benchmarks/common.py``'s variable name, read without putting benchmarks/ on the path."""
    path = Path(__file__).parents[2] / "benchmarks" / "common.py"
    spec = importlib.util.spec_from_file_location("_benchmarks_common", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SMOKE_MODEL_ENV


SMOKE_MODEL_ENV = _smoke_model_env()


def _load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module (its functions; ``main`` not run), with
    benchmarks/ on the path for its own imports."""
    bench = Path(__file__).parents[2] / "benchmarks"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = module  # its functions pickle by name (worker processes)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def load_benchmark():
    """``load_benchmark(name)``: a benchmark script as a module."""
    return _load_benchmark


@pytest.fixture(scope="session", autouse=True)
def _one_smoke_model(tmp_path_factory, request):
    """The benchmark scripts' ``--smoke`` runs (and the tests that import them) train the smoke
    preset's model; train it once per test run — the first xdist worker to need it, under a
    file lock, while the others wait and then load it — and let them load it
    (``SMOKE_MODEL_ENV``, inherited by the scripts' subprocesses): about 13 s saved per smoke
    run and one training per worker. The file lives in this run's temporary directory only."""
    from filelock import FileLock

    from pyro_backpass.learning import PRESETS, train_model

    before = os.environ.get(SMOKE_MODEL_ENV)
    base = tmp_path_factory.getbasetemp()
    # An xdist popen worker's basetemp is popen-gwN inside the run's own: share that one.
    worker = hasattr(request.config, "workerinput") and base.name.startswith("popen-")
    root = base.parent if worker else base
    path = root / "smoke_model" / "smoke.safetensors"
    with FileLock(str(root / "smoke_model.lock")):
        if not path.is_file():
            with torch.random.fork_rng():  # leave the tests' own seeding as it was
                run = tmp_path_factory.mktemp("smoke_run")  # this worker's own checkpoints
                gm = train_model(PRESETS["smoke"], out_dir=run, progress=False)
            path.parent.mkdir(exist_ok=True)
            gm.save(path)  # atomic: a worker never loads half a file
    os.environ[SMOKE_MODEL_ENV] = str(path)
    yield
    if before is None:
        os.environ.pop(SMOKE_MODEL_ENV, None)
    else:
        os.environ[SMOKE_MODEL_ENV] = before
