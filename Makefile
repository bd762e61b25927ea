# robust-train — `make help` lists the targets. Every target that needs Python sets up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run test test-fast lint format bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv (if missing) and install robust-train with its dev tools

run: $(STAMP) ## train and evaluate the default config (digits, small CNN, ERM) into outputs/
	$(BIN)/robust-train $(ARGS)

test: $(STAMP) ## run the test suite (CPU; GPU tests run with `make test PYTEST_ARGS="-m gpu"`)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP) ## ruff
	$(BIN)/ruff check .

format: $(STAMP) ## ruff format + import sorting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) ## measure speed ratios against each method's physical limit into bench/results.json
	$(BIN)/python bench/run.py

clean: ## remove outputs, caches and the venv
	rm -rf outputs multirun .pytest_cache .ruff_cache $(VENV) *.egg-info
