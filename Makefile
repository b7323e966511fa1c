# The two commands: `make demo` and `make test`. Both install into .venv first.
# `make bench` (bench/run.py) also installs the bench-only dependencies.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# The bench has a virtualenv of its own: quixstreams pins confluent-kafka < 2.13,
# which must not leak into the venv that `make lint` and `make test` use.
BENCH_VENV ?= .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed-stamp

.PHONY: install system-deps demo test test-unit test-integration test-helm test-reliability lint fmt clean bench bench-backfill

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Benchmarks: bench-only dependencies (quixstreams, psutil, py-spy) on top of dev.
$(BENCH_STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/pip install --quiet -e ".[dev,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python bench/run.py $(BENCH_ARGS)

# Live latency with and without a 120k-row backfill, and backfill rows/s (issue 6).
bench-backfill: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python bench/backfill.py $(BENCH_ARGS)

# PostgreSQL and Mosquitto from Debian, for the tests that run them (.ci/system-deps.sh)
system-deps:
	@bash .ci/system-deps.sh

demo: install
	$(BIN)/pipeline demo $(DEMO_ARGS)

# Two test files at a time (pytest-xdist; each worker its own broker): integration
# tests mostly wait on real processes, so two overlap well on 2 cores.
TEST_JOBS ?= 2

test: install system-deps
	$(BIN)/pytest --ignore=tests/reliability -n $(TEST_JOBS) --dist loadfile

# Crash, restart and bad-input scenarios (several minutes); CI runs them too.
test-reliability: install system-deps
	$(BIN)/pytest tests/reliability

test-unit: install
	$(BIN)/pytest tests/unit

test-integration: install system-deps
	$(BIN)/pytest tests/integration

test-helm: install
	$(BIN)/pytest tests/helm

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(BENCH_VENV) demo-output .pytest_cache .mypy_cache .ruff_cache
