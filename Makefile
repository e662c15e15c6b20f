# One task runner; each recipe is also the documentation of how to do that thing.
# A fresh machine needs only python3 (>= 3.11): `make demo` and `make test` set everything up.

PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup demo test test-fast lint typecheck schemas bench clean help

help:           ## list the recipes
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP) ## create the virtualenv and install the project with its dev tools

demo: setup     ## run the whole pipe on embedded defaults against the vendor sandboxes (Ctrl-C stops)
	$(BIN)/flash demo

test: setup     ## the whole test suite (unit, contract, integration, e2e) on the real broker and PostgreSQL
	$(BIN)/pytest -m "not slow" -q

test-fast: setup ## unit tests only (no sockets)
	$(BIN)/pytest -m unit -q

lint: setup     ## ruff over everything
	$(BIN)/ruff check .

typecheck: setup ## mypy --strict over libs and services
	$(BIN)/mypy libs services

schemas: setup  ## regenerate schemas/ and docs/asyncapi.yaml (+ the topic table of docs/events.md) from the code
	$(BIN)/python -m canonical.schemas
	$(BIN)/python -m canonical.asyncapi

bench: setup    ## every benchmark, each printing its figures
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:          ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
