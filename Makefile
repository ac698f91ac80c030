# Two commands: `make run` starts the service, `make test` runs every check.
# Both create ./.venv on first use; nothing else needs to be installed but python3 >= 3.11 and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP     := $(VENV)/.dev-installed

.PHONY: run test lint typecheck pytest audit check-deploy fmt bench chaos clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "python3 >= 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUNTIME_STAMP): requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $@

$(DEV_STAMP): requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@ $(RUNTIME_STAMP)

run: $(RUNTIME_STAMP)
	HOST=$${HOST:-127.0.0.1} $(BIN)/python -m app

test: lint typecheck pytest audit check-deploy

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

pytest: $(DEV_STAMP)
	$(BIN)/python -m pytest --cov --cov-report=term-missing:skip-covered $(PYTEST_ARGS)

audit: $(DEV_STAMP)
	$(BIN)/python .ci/audit.py

check-deploy: $(DEV_STAMP)
	PYTHON="$(PYTHON)" HADOLINT=$(BIN)/hadolint .ci/check_deploy.sh

fmt: $(DEV_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(DEV_STAMP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# The fault-injection suite (tests/faults/, a short run of it is part of `make test`), longer:
# CHAOS_SEEDS schedules per store (default 5) of CHAOS_EVENTS changes (400) with faults for
# CHAOS_SECONDS (90). FAULT_SEED=N[,M...] repeats given schedules.
chaos: $(DEV_STAMP)
	FAULT_PROFILE=chaos $(BIN)/python -m pytest tests/faults $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .venv-checkov .venv-contract bench/.venv-ff .mypy_cache .ruff_cache .pytest_cache .hypothesis .coverage
