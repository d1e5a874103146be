# kd-experiments: the two README commands are `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STORE := $(CURDIR)/mlruns/mlflow.db

.PHONY: setup demo test test-fast test-cluster bench ui clean

setup: $(VENV)/.installed  ## create .venv and install the package with its dev tools

$(VENV)/.installed: pyproject.toml .ci/uv_sources.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# uv unpacks the wheels in parallel (torch and its CUDA libraries, 5.5 GB, are most of the
	@# install: about 40 s instead of pip's two minutes on 2 cores), from the sources pip is
	@# configured with (.ci/uv_sources.py); pip installs instead where uv cannot
	$(BIN)/python -m pip install -q uv
	$(BIN)/uv pip install -q --python $(BIN)/python $$($(BIN)/python .ci/uv_sources.py) -e '.[dev]' \
	  || $(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# Byte-compiled once on every core before the suite (its many processes would each compile
# what they import); the demo compiles on first import only what it uses (about 20 s, against
# a minute for the whole venv). A few files written for newer Pythons do not compile, as under
# pip, and are left as they are.
$(VENV)/.compiled: $(VENV)/.installed
	$(BIN)/python -m compileall -qq -j 0 $(VENV)/lib || true
	touch $@

# Bytecode caches go into .venv whatever the calling shell sets (without them every process
# of a sweep or of the suite compiles its imports again).
unexport PYTHONDONTWRITEBYTECODE

demo: setup  ## the main job: a sweep over compression ratios, tracked in ./mlruns, then its report
	$(BIN)/kd-train --config-dir sweeps --config-name quickstart_compression
	$(BIN)/kd-report --experiment quickstart --sweep latest
	@echo
	@echo "Browse every run in the MLflow UI (then open http://127.0.0.1:5000):"
	@echo "  $(BIN)/mlflow ui --backend-store-uri sqlite:///$(STORE) --host 127.0.0.1 --port 5000"

TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: setup $(VENV)/.compiled  ## the whole test suite on $(TEST_WORKERS) pytest-xdist workers (CPU, about 8 minutes on 2 cores)
	$(PYTEST)

test-fast: setup $(VENV)/.compiled  ## the suite without the cluster tests
	$(PYTEST) -m "not cluster"

test-cluster: setup $(VENV)/.compiled  ## the cluster tests alone: Ray, submitit, two-node torchrun, PostgreSQL (127.0.0.1)
	$(PYTEST) -m cluster

ui: setup  ## serve the MLflow UI of ./mlruns on 127.0.0.1:5000
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(STORE) --host 127.0.0.1 --port 5000

clean:  ## remove run outputs (keeps .venv and ./mlruns)
	rm -rf logs outputs multirun .pytest_cache
