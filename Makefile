# One task runner; each recipe is also the documentation of how to do that thing.
# A fresh machine needs only python3 (>= 3.11): `make demo` and `make test` set everything up.

PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup browser demo test test-fast lint typecheck schemas bench clean help

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

browser:        ## Debian's chromium for the browser test (apt-get as root; otherwise that test is skipped, saying why)
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (apt-get) for the browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
	    >/dev/null) || echo "chromium could not be installed: the browser test will be skipped"; \
	else echo "no chromium, and not root with apt-get: the browser test will be skipped (install chromium)"; fi

test: setup browser ## the whole test suite (unit, contract, integration, e2e) on the real broker and PostgreSQL
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
