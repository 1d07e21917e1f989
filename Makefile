# The two commands of the quick start: `make run` serves the demo experts, `make test` tests.
# Each sets up .venv by itself. CPU machines get the CPU build of torch; on a GPU machine,
# install the CUDA torch that matches the driver into .venv first (see README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
CONFIG ?= configs/local.yaml

.PHONY: run test test-vllm lint typecheck load chaos bench-serving clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# Ray hands out logical CPUs: claim 8 so every replica fits on a 2-core machine.
run: $(VENV)/.installed
	$(BIN)/frugalserve serve --config $(CONFIG) --num-cpus 8

# Lint, type-check, then the test suite: what CI runs (.ci/run).
test: lint typecheck
	$(BIN)/python -m pytest

LOAD_HOST ?=
LOAD_TIME ?= 60s
LOAD_USERS ?= 8
LOAD_OUT ?= out/load

# Headless locust for LOAD_TIME against LOAD_HOST, or against CONFIG started for the run.
load: $(VENV)/.installed
	$(BIN)/python -m frugalserve.cluster.load.run $(if $(LOAD_HOST),--host $(LOAD_HOST),--serve $(CONFIG)) \
		--users $(LOAD_USERS) --spawn-rate $(LOAD_USERS) --run-time $(LOAD_TIME) --out $(LOAD_OUT)

CHAOS_ARGS ?=

# Replicas killed and a remote expert failing under steady load, on loopback; the report and the
# targets in benchmarks/results/chaos-cpu.json (docs/benchmarks.md). CI runs a small one
# (tests/serve_app/test_failover.py).
chaos: $(VENV)/.installed
	$(BIN)/python benchmarks/chaos.py $(CHAOS_ARGS)

VLLM ?= 0.33.0
VLLM_VENV := .venv-vllm-$(VLLM)

# Not in CI: vLLM pulls its own CUDA torch (several GB). One venv per supported vLLM release
# (`make test-vllm VLLM=0.24.0`); runs on CPU too (Triton interpreter), without starting an engine.
test-vllm:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q -e ".[dev]" "vllm==$(VLLM)" pytest pytest-timeout
	$(VLLM_VENV)/bin/python -m pytest tests/vllm tests/experts/test_vllm_engine.py

lint: $(VENV)/.installed
	$(BIN)/ruff check .

# mypy finds modules by path, and the packages install from folders named otherwise
# (setuptools package-dir), so it reads them through links laid out as the installed package.
TYPECHECK := build/typecheck
typecheck: $(VENV)/.installed
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/frugalserve
	ln -s $(CURDIR)/frugalserve/*.py $(TYPECHECK)/frugalserve/
	for d in serve_app experts cascade kernels cluster; do ln -s $(CURDIR)/$$d $(TYPECHECK)/frugalserve/$$d; done
	cd $(TYPECHECK) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml \
		--cache-dir $(CURDIR)/.mypy_cache -p frugalserve

# Serving through HTTP at 1/8/32/64 clients on this machine (docs/benchmarks.md).
bench-serving: $(VENV)/.installed
	$(BIN)/python benchmarks/serving.py --experts demo-llama --target demo-llama \
		--serve-env RAY_SERVE_THROUGHPUT_OPTIMIZED=1 --out benchmarks/results/serving-cpu.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache
