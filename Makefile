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

DEMO := demo-output
DEMO_RUNS := $(DEMO)/runs

# The whole chain on the synthetic cohort: the coordinator trains the three twin
# submodels, site-1 builds one patient's twin, the stewards audit every ledger.
demo: setup
	$(VENV)/bin/fedtwin-coordinator demo --out $(DEMO)
	$(VENV)/bin/fedtwin-site predict --site-config $(DEMO)/consortium/site-1 --patient demo-s1-001 \
		--checkpoint $(DEMO_RUNS)/demo-lab-forecast/round-3 --checkpoint $(DEMO_RUNS)/demo-crs-risk/round-3 \
		--checkpoint $(DEMO_RUNS)/demo-cell-state/round-3 --out $(DEMO)/twin
	$(VENV)/bin/fedtwin-steward report $(DEMO)/consortium/*/state/ledger.jsonl --out $(DEMO)/steward
	@echo "Checkpoints: $(DEMO_RUNS)/<run>/round-3; patient twin: $(DEMO)/twin; steward report: $(DEMO)/steward/index.html"

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
