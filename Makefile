# fedopt: set up a virtual environment, run the demo, the tests, the benchmarks.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedopt-installed

.PHONY: setup demo test bench reproduce lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/fedopt run scenarios/quickstart.toml

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

# The benchmarks run in a venv of their own: pfl-research 0.6 (the [bench] extra)
# needs dp-accounting<0.6, and the tests pin ε values from dp-accounting 0.6.
BENCH_VENV  ?= .venv-bench
BENCH_PY    := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.fedopt-installed

$(BENCH_STAMP): pyproject.toml
	test -x $(BENCH_PY) || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --quiet --upgrade pip
	$(BENCH_PY) -m pip install --quiet torch==2.13.0
	$(BENCH_PY) -m pip install --quiet torch==2.13.0 -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_PY) bench/overhead.py

reproduce: setup
	$(VENV)/bin/fedopt reproduce --report docs/reproductions.md

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf runs .pytest_cache
