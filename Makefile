# Every target sets itself up: `make demo` and `make test` work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# pytest-xdist workers (one torch thread each; tests/conftest.py): the suite's tests are
# mostly single-threaded, so one worker per core nearly halves `make test` on 2 cores.
TEST_WORKERS ?= 2

.PHONY: install demo test test-all lint notebooks bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) -m pyro_backpass demo --out figures/demo

test: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -m "not slow" -q -n $(TEST_WORKERS) --dist worksteal --durations=15

test-all: install
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

lint: install
	$(PY) -m ruff check pyro_backpass tests benchmarks
	$(PY) -m ruff format --check pyro_backpass tests benchmarks
	$(VENV)/bin/lint-imports

notebooks: install
	$(PY) -m pytest -q tests/test_notebooks.py

bench: install
	$(PY) benchmarks/greedy_vs_exact.py

clean:
	rm -rf $(VENV) figures .pytest_cache
