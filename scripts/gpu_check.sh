#!/usr/bin/env bash
# The GPU check: family exactness on CUDA against the CPU (tests/test_gpu.py), then the speed benchmarks (VTW with
# whole-model, CUDA-graph and regional compilation and the static-cache decode, YOPO).
# Runs with the Python on PATH (its own torch >= 2.6 with CUDA, transformers 5.x), from a source checkout, offline:
#   bash scripts/gpu_check.sh [extra benchmark args]      (or: make gpu-check)
# Without a CUDA device the tests skip and the benchmark runs its small CPU shape.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p out/gpu
"$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py | tee out/gpu/tests.txt
"$PYTHON" benchmarks/bench_speed.py --out out/gpu/speed.json "$@" | tee out/gpu/speed.txt
"$PYTHON" benchmarks/bench_speed.py --compile-mode regional,reduce-overhead --batch 1 --visual 576 --no-static \
    --out out/gpu/speed_batch1_modes.json | tee out/gpu/speed_batch1_modes.txt
"$PYTHON" benchmarks/bench_yopo.py | tee out/gpu/yopo.txt
