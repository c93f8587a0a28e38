# Two commands a new user needs: `make run` and `make test`. Both reuse .venv and reinstall
# only when pyproject.toml changed (the stamp files below).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench base screenshots clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev,ray]"
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/xltop $(ARGS)

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/run_all.py $(ARGS)

# A base to adapt (docs/adaptation.md): the `base` preset trained on the standard library's Python
# code, with the statistics ttt++ needs. BASE and ARGS (e.g. ARGS="--steps 200") override.
BASE ?= base.safetensors
base: $(VENV)/.installed
	$(BIN)/python -m ttt_runtime.adapt.make_base $(BASE) --preset base $(ARGS)

screenshots: $(VENV)/.installed-dev
	$(BIN)/python scripts/screenshots.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache
