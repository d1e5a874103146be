# kd-experiments: the two README commands are `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STORE := $(CURDIR)/mlruns/mlflow.db

.PHONY: setup demo test test-fast test-cluster bench ui clean

setup: $(VENV)/.installed  ## create .venv and install the package with its dev tools

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -e '.[dev]'
	@# byte-compile on every core (pip compiles on one, a minute more on 2 cores); a few files
	@# written for newer Pythons do not compile, as under pip, and are left as they are
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $@

demo: setup  ## the main job: a sweep over compression ratios, tracked in ./mlruns, then its report
	$(BIN)/kd-train --config-dir sweeps --config-name quickstart_compression
	$(BIN)/kd-report --experiment quickstart --sweep latest
	@echo
	@echo "Browse every run in the MLflow UI (then open http://127.0.0.1:5000):"
	@echo "  $(BIN)/mlflow ui --backend-store-uri sqlite:///$(STORE) --host 127.0.0.1 --port 5000"

TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: setup  ## the whole test suite on $(TEST_WORKERS) pytest-xdist workers (CPU, about 10.5 minutes on 2 cores)
	$(PYTEST)

test-fast: setup  ## the suite without the cluster tests (about 8.5 minutes on 2 cores)
	$(PYTEST) -m "not cluster"

test-cluster: setup  ## the cluster tests alone: Ray, submitit, two-node torchrun, PostgreSQL (127.0.0.1; about 4 minutes)
	$(PYTEST) -m cluster

ui: setup  ## serve the MLflow UI of ./mlruns on 127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(STORE) --host 127.0.0.1 --port 5000

clean:  ## remove run outputs (keeps .venv and ./mlruns)
	rm -rf logs outputs multirun .pytest_cache
