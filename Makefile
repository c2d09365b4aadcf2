# The two commands a new user runs first: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-slow lint test-all bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/fenfa bench --quick

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy

# `make test` leaves out the tests marked slow (tests/conftest.py: SLOW_TESTS),
# to stay under six minutes on 2 cores; `make test-slow` runs only those.
# .ci/run runs both, so CI runs the whole suite.
test: lint
	$(BIN)/python -m pytest -m "not slow"

test-slow: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m slow

# The suite on every supported Python (3.11, 3.12, 3.13 under pyenv), through nox.
test-all: $(VENV)/.installed-test
	$(BIN)/python -m pip install -q nox
	PYENV_VERSION=$$(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[123]\.' | paste -sd: -) \
		$(BIN)/nox

bench: $(VENV)/.installed-bench
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf $(VENV) .nox .pytest_cache .mypy_cache .ruff_cache build dist
