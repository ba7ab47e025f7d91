# The two commands: `make demo` and `make test`. Both bootstrap .venv themselves.
# `make test-fast` is the edit-run loop: unit tests only (no processes started, no training).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_HOME ?= $(CURDIR)/demo-home
PYTEST_ARGS ?=

.PHONY: demo test test-fast lint typecheck bench bench-peers clean venv

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Jetbox needs Python 3.11+"'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { echo "python venv failed: apt-get install python3-venv"; exit 1; }
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[ml,dev,s3]'
	@touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration" $(PYTEST_ARGS)

demo: $(STAMP)
	@bash scripts/demo.sh "$(DEMO_HOME)"

bench: $(STAMP)
	$(BIN)/python bench/store.py

# Jetbox beside eventsourcing, DBOS, raw RQ and raw sqlite3 (bench/peers.py). The peers go into their
# own environment, pinned by bench/peers-constraints.txt, so they never become Jetbox dependencies.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
PEERS_ARGS ?=

$(BENCH_STAMP): pyproject.toml constraints.txt bench/peers-constraints.txt
	@test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check -c constraints.txt \
		-c bench/peers-constraints.txt -e . eventsourcing dbos
	@touch $(BENCH_STAMP)

bench-peers: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python bench/peers.py $(PEERS_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(DEMO_HOME) .pytest_cache .mypy_cache .ruff_cache
