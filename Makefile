# The two commands of the quick start: `make run` serves the demo experts, `make test` tests.
# Each sets up .venv by itself. CPU machines get the CPU build of torch; on a GPU machine,
# install the CUDA torch that matches the driver into .venv first (see README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
CONFIG ?= configs/local.yaml

.PHONY: run test lint bench-batching clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

run: $(VENV)/.installed
	$(BIN)/frugalserve serve --config $(CONFIG)

test: $(VENV)/.installed
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .

bench-batching: $(VENV)/.installed
	$(BIN)/python benchmarks/batching.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
