# The two commands: `make run` starts the server, `make test` runs the whole suite.
# Both create or refresh .venv first, so a fresh machine needs only Python 3.11+ and make.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SOURCES := taskserver tests twisted bench

.PHONY: run test lint venv clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# A plain (non-editable) install: twistd must find the plugin the way users' installs will.
venv: $(BIN)/python
	$(BIN)/python -m pip install -q '.[test]'
	@rm -rf build
	@# Refresh Twisted's plugin cache so twistd neither rescans nor warns.
	@$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

run: venv
	$(BIN)/twistd --pidfile= -n taskserver

lint: venv
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)
	$(BIN)/mypy

# Two processes run the suite at once (most tests wait on subprocesses and sockets), then the
# tests marked `serial` (they measure or bound timings under load) run alone.
test: lint
	$(BIN)/pytest -n 2 -m "not serial"
	$(BIN)/pytest -m serial

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache

# The benchmark (issue 5): taskserver against a bare Klein + LPUSH floor, loopback only,
# bounded (10 s of load per run). Needs wrk, from Debian's packages. Then the dashboard and
# /metrics at 1,000,000 pending and 100,000 dead tasks (fails if a median is 0.5 s or more).
# Then the embedded Redis's CPU per task (3 rounds of 5 s loads): what one primary can carry.
bench: venv
	@command -v wrk >/dev/null || { echo "make bench needs wrk: apt-get install wrk"; exit 1; }
	$(BIN)/python bench/run.py
	$(BIN)/python bench/dashboard_scale.py
	$(BIN)/python bench/redis_cpu.py
