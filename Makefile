# Two commands for a newcomer: `make repro` (the whole pipeline) and `make test` (the test suite;
# `make test-fast` skips the slow end-to-end runs).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install repro test test-fast bench clean-venv

install: $(STAMP)

# Reinstall whenever the project's dependencies change.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

repro: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro
	@cat metrics/summary.md

# The tests run in a network namespace of their own where the OS allows it (tests/offline/isolated).
ISOLATED := tests/offline/isolated

test: install
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(ISOLATED) $(BIN)/python -m pytest

# Everything but the end-to-end runs marked slow (dvc repro, torchrun, real training).
test-fast: install
	$(BIN)/ruff check .
	PATH="$(CURDIR)/$(BIN):$$PATH" $(ISOLATED) $(BIN)/python -m pytest -m "not slow"

bench: install
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/bench.py

clean-venv:
	rm -rf $(VENV)
