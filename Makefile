# `make test` and `make demo` set everything up on a fresh machine by themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
INSTALLED := $(VENV)/.collapse-ext-installed
SOURCES := setup.py pyproject.toml $(shell find csrc -type f)
# nvcc lives in /usr/local/cuda on our machines; elsewhere torch finds it on PATH.
CUDA_HOME ?= $(shell [ -x /usr/local/cuda/bin/nvcc ] && echo /usr/local/cuda)
export CUDA_HOME
MAX_JOBS ?= $(shell nproc)
export MAX_JOBS

.PHONY: all build test test-wheel demo bench bench-readme bench-pytest lint format clean

all: build

$(DEPS): requirements-dev.txt
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# Editable install into .venv: .venv/bin/python and .venv/bin/collapse-ext import this
# checkout from any directory. Objects are kept in build/editable, so a rebuild after a
# change in csrc/ recompiles only what changed. USE_CUDA=0 builds the CPU kernels only.
$(INSTALLED): $(DEPS) $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

# An in-place build newer than every source (`setup.py build_ext --inplace` after an
# editable install) is current: the editable rebuild would only compile it all again.
build: $(DEPS)
	@ls collapse_ext/_C*.so >/dev/null 2>&1 || rm -f $(INSTALLED)
	@so=$$(ls -t collapse_ext/_C*.so 2>/dev/null | head -n 1); \
	if [ -f $(INSTALLED) ] && [ -n "$$so" ] && [ -z "$$(find $(SOURCES) -newer "$$so" | head -n 1)" ]; then \
		touch $(INSTALLED); \
	fi
	@$(MAKE) --no-print-directory $(INSTALLED)

test: build
	$(PY) -m pytest -q tests

# The packaging test alone: a CPU-only wheel built in a temporary directory (CI runs it in `make test`).
test-wheel: build
	COLLAPSE_EXT_WHEEL_TEST=1 $(PY) -m pytest -q tests/test_packaging.py

# The digits demo (balanced and imbalanced runs, the LPM prediction and sweep): a progress
# bar per run, a one-screen summary, and the HTML report in $(DEMO_REPORT)/report.html.
DEMO_REPORT ?= demo_report
DEMO_ARGS ?=
demo: build
	$(PY) -m collapse_ext.cli demo --report $(DEMO_REPORT) $(DEMO_ARGS)

# The benchmark suite: ceilings, then every case; results in benchmarks/results/<device>.json
# (<device>-quick.json with BENCH_ARGS=--quick).
BENCH_ARGS ?=
bench: build
	$(PY) -m benchmarks $(BENCH_ARGS)

# The README's benchmark section from the last full CPU run (make bench): the scaling plots
# into docs/bench/, then the table between the README's benchmarks markers.
BENCH_RESULTS ?= benchmarks/results/cpu.json
bench-readme: build
	$(PY) -m benchmarks.plots $(BENCH_RESULTS) --out docs/bench
	$(PY) -m benchmarks.table $(BENCH_RESULTS) --readme --plots-dir docs/bench --write README.md

# The ops as pytest-benchmark tests (not part of `make test`).
bench-pytest: build
	$(PY) -m pytest -q benchmarks --benchmark-only

lint: $(DEPS)
	$(PY) -m ruff check collapse_ext tests benchmarks setup.py
	$(PY) -m ruff format --check collapse_ext tests benchmarks setup.py

format: $(DEPS)
	$(PY) -m ruff format collapse_ext tests benchmarks setup.py
	$(PY) -m ruff check --fix collapse_ext tests benchmarks setup.py

clean:
	rm -rf build dist *.egg-info collapse_ext/_C*.so $(INSTALLED)
