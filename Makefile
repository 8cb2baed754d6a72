# `make test` and `make demo` set everything up on a fresh machine by themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
# nvcc lives in /usr/local/cuda on our machines; elsewhere torch finds it on PATH.
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
export CUDA_HOME
MAX_JOBS ?= $(shell nproc)
export MAX_JOBS

.PHONY: all build test test-fast demo bench lint format clean

all: build

$(DEPS): requirements-dev.txt
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

build: $(DEPS)
	$(PY) setup.py --quiet build_ext --inplace

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) -m collapse_ext.cli demo
	$(PY) -m collapse_ext.cli lpm-sweep --plot minority_collapse.png

bench: build
	cd benchmarks && for b in bench_*.py; do PYTHONPATH=.. ../$(PY) $$b || exit 1; done

lint: $(DEPS)
	$(PY) -m ruff check collapse_ext tests benchmarks setup.py
	$(PY) -m ruff format --check collapse_ext tests benchmarks setup.py

format: $(DEPS)
	$(PY) -m ruff format collapse_ext tests benchmarks setup.py
	$(PY) -m ruff check --fix collapse_ext tests benchmarks setup.py

clean:
	rm -rf build collapse_ext/_C*.so
