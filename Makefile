# The two commands of the README: `make run` and `make test`.
# Both install into a virtualenv of their own (.venv), so a fresh clone needs only Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: run test install install-dev lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q -e .

install-dev: $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'

# Serve on http://127.0.0.1:8000 (API, /admin/, /schema). Without DATABASE_URL it starts an
# embedded PostgreSQL under .jobs_app/; without secrets, dev mode generates and prints them.
# SERVE_ARGS="--port 8001 --workers 2" make run passes options to `jobs-app serve`.
run: install
	JOBS_DEV_MODE=$${JOBS_DEV_MODE:-1} $(BIN)/jobs-app serve $(SERVE_ARGS)

# pytest exits 5 when it collected no tests: say so, and fail.
test: install-dev
	@rc=0; $(BIN)/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: that is a failure here"; fi; \
	exit $$rc

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: install-dev
	$(BIN)/python -m bench $(BENCH_ARGS)
