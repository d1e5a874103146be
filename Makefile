# kd-experiments: the two README commands are `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STORE := $(CURDIR)/mlruns/mlflow.db

.PHONY: setup setup-run demo test test-fast test-cluster bench ui clean

# Python writes the bytecode cache of each module the first time it imports it; a shell that
# turns this off (PYTHONDONTWRITEBYTECODE) would make every process compile again, so these
# targets leave it on. Nothing is compiled ahead: the demo imports a few thousand of the
# 22,000 Python files installed, and compiling all of them took longer than the demo's sweep.
unexport PYTHONDONTWRITEBYTECODE

setup: $(VENV)/.installed-dev  ## create .venv and install the package with its dev tools (what `make test` needs)

setup-run: $(VENV)/.installed  ## create .venv and install the package alone (what `make demo` needs)

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q --no-compile -e '.[dev]'
	touch $@

demo: setup-run  ## the main job: a sweep over compression ratios, tracked in ./mlruns, then its report
	$(BIN)/kd-train --config-dir sweeps --config-name quickstart_compression
	$(BIN)/kd-report --experiment quickstart --sweep latest
	@echo
	@echo "Browse every run in the MLflow UI (then open http://127.0.0.1:5000):"
	@echo "  $(BIN)/mlflow ui --backend-store-uri sqlite:///$(STORE) --host 127.0.0.1 --port 5000"

TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: setup  ## the whole test suite on $(TEST_WORKERS) pytest-xdist workers (CPU, about 11 minutes on 2 cores)
	$(PYTEST)

test-fast: setup  ## the suite without the cluster tests (about 8.5 minutes on 2 cores)
	$(PYTEST) -m "not cluster"

test-cluster: setup  ## the cluster tests alone: Ray, submitit, two-node torchrun, PostgreSQL (127.0.0.1; about 4 minutes)
	$(PYTEST) -m cluster

ui: setup-run  ## serve the MLflow UI of ./mlruns on 127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(STORE) --host 127.0.0.1 --port 5000

clean:  ## remove run outputs (keeps .venv and ./mlruns)
	rm -rf logs outputs multirun .pytest_cache
