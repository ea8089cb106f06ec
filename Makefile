# unclip: `make demo` and `make test` work on a fresh machine (they create .venv).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
PROMPT ?= a red apple, noto style

.PHONY: demo test test-fast lint format clean help

help:
	@echo "make demo       create .venv, install, generate an image with the default model"
	@echo "make test       create .venv, install with test extras, run the whole suite"
	@echo "make test-fast  the suite without the slow training checks"
	@echo "make lint       ruff check + format check"

# torch is installed first and pinned, so that the package's range (torch>=2.4)
# is already satisfied and pip never pulls a CUDA build.
$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH)"
	@touch $@

$(VENV)/.core: $(VENV)/.torch pyproject.toml
	$(PIP) install --quiet -e .
	@touch $@

$(VENV)/.test: $(VENV)/.torch pyproject.toml
	$(PIP) install --quiet -e ".[test,dev]"
	@touch $@ $(VENV)/.core

demo: $(VENV)/.core
	@$(PY) -m unclip.demo "$(PROMPT)"

test: $(VENV)/.test
	@$(PY) -m pytest; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected; a suite must exist" >&2; exit 1; fi; \
	exit $$rc

test-fast: $(VENV)/.test
	$(PY) -m pytest -m "not slow"

lint: $(VENV)/.test
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(VENV)/.test
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
