# Set-up and everyday commands. `make demo` and `make test` work on a fresh machine: they create .venv,
# install torch==2.13.0 (the CPU wheel; an unpinned torch would pull GBs of CUDA packages) and then
# outlierkit with all its extras.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.outlierkit-installed
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test test-all lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[all,dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/outlierkit demo

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

lint: setup
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
