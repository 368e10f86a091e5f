PYTHON ?= python3
PIP := $(PYTHON) -m pip

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-10s %s\n", $$1, $$2}'

.PHONY: install
install: ## Install the service with its dependencies (builds the kernel)
	$(PIP) install .

.PHONY: serve
serve: install ## Install, then run the service on the bundled demo catalogue
	mab-service serve

.PHONY: dev
dev: ## Editable install with the test tools (builds the kernel in place)
	$(PIP) install -e '.[test]'

.PHONY: compile
compile: ## Rebuild the kernel in place after editing csrc/ or .pyx files
	$(PIP) install --no-deps -e .

.PHONY: debug
debug: ## Rebuild the kernel in place unoptimised, with Cython line tracing and annotation
	MAB_DEBUG=1 $(PYTHON) setup.py build_ext --inplace --force

.PHONY: check
check: ## Lint and type-check
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy

.PHONY: test
test: dev check ## Install, lint, type-check and run the test suite (what CI runs)
	$(PYTHON) -m pytest

.PHONY: test-perf
test-perf: ## Timed comparisons (opt-in: a shared machine makes them flaky): metrics on against off, in process
	$(PYTHON) -m pytest -m perf

.PHONY: bench
bench: ## Kernel benchmark: ns per sample against numpy, 1 and 2 threads
	taskset -c 0,1 $(PYTHON) -m benchmarks.bench_kernel --versions

EMULATOR_PORT ?= 8086
EMULATOR_ARGS ?= --latency-ms 5 --jitter-ms 2

.PHONY: emulator
emulator: ## Local Vertex AI Feature Store on 127.0.0.1:8086 (FEATURES=table.csv, EMULATOR_ARGS=...)
	$(PYTHON) -m mab_service.emulator --port $(EMULATOR_PORT) $(if $(FEATURES),--features $(FEATURES)) $(EMULATOR_ARGS)

.PHONY: loadtest
loadtest: ## Locust load test on loopback: RPS per node within the p99 budget (about 2 min; ARGS="--help")
	$(PYTHON) -m loadtests.run $(ARGS)

.PHONY: bench-all
bench-all: ## All benchmarks, both baselines (Go built here), size sweep; writes docs/benchmarks/ (about 10 min)
	$(PYTHON) -m benchmarks.run_all $(ARGS)

VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' mab_service/__init__.py)

.PHONY: image
image: ## Build the container image mab-service:VERSION (needs Docker; see docs/operations.md)
	docker build -t mab-service:$(VERSION) .

.PHONY: deploy-check
deploy-check: ## Lint the Dockerfile and validate deploy/ against the Kubernetes schemas (what the tests run)
	$(PYTHON) -m pytest -q tests/test_deploy.py

.PHONY: clean
clean: ## Remove build products
	rm -rf build dist *.egg-info mab_service/policy/_kernel.cpp mab_service/policy/*.so mab_service/policy/*.html
