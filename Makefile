# Two commands for a newcomer: `make repro` (the whole pipeline) and `make test` (the test suite;
# `make test-fast` skips the slow end-to-end runs).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install repro test test-fast bench lock clean-venv

install: $(STAMP)

# Reinstall whenever the project's dependencies change: the pinned versions of requirements.lock,
# then the project itself without resolving anything again.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

# Refresh requirements.lock after editing the dependencies in pyproject.toml (Linux x86_64, this
# Python). Where pip is capped to the torch releases on a machine's disk, the cap applies here too.
PIP_CAP := $(wildcard /etc/xdg/pip/constraints.txt)
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet pip-tools
	.venv-lock/bin/pip-compile --quiet --extra dev --strip-extras --no-emit-index-url --no-emit-find-links \
		$(if $(PIP_CAP),--constraint $(PIP_CAP)) --output-file requirements.lock pyproject.toml

repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@cat metrics/summary.md

# The tests run in a network namespace of their own where the OS allows it (tests/offline/isolated).
# The log ends with the 15 slowest tests, so a change that slows the suite shows where (target: under 30 min on 2 cores).
ISOLATED := tests/offline/isolated

test: install
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(ISOLATED) $(BIN)/python -m pytest --durations=15

# Everything but the end-to-end runs marked slow (dvc repro, torchrun, real training).
test-fast: install
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(ISOLATED) $(BIN)/python -m pytest -m "not slow"

bench: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/bench.py

clean-venv:
	rm -rf $(VENV)
