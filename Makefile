# fedtwin developer commands. Every target uses the virtual environment in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: setup demo test test-fast bench results lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: the CPU wheel 2.13.0 avoids a multi-GB CUDA download.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/fedtwin-coordinator demo --out demo-output

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -ra -m "not simulation and not deployment"

bench: setup
	$(PY) bench/run_all.py

results: setup
	$(PY) bench/results.py --out docs/results.md

lint: setup
	$(VENV)/bin/ruff check server client models privacy tests bench
	$(VENV)/bin/ruff format --check server client models privacy tests bench
	$(VENV)/bin/mypy

clean:
	rm -rf demo-output runs .pytest_cache .mypy_cache .ruff_cache
