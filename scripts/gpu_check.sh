#!/usr/bin/env bash
# The GPU check: family exactness on CUDA against the CPU (tests/test_gpu.py), then the speed benchmarks (YOPO; VTW with
# whole-model, CUDA-graph and regional compilation and the static-cache decode).
# Runs with the Python on PATH (its own torch >= 2.6 with CUDA, transformers 5.x), from a source checkout, offline:
#   bash scripts/gpu_check.sh [extra benchmark args]      (or: make gpu-check)
# Without a CUDA device the tests skip and the benchmark runs its small CPU shape.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p out/gpu
# The runs nothing has measured on a GPU yet come first (a device session is short; each step's output is kept):
# YOPO's dense / FlexAttention / split rows, then VTW's batch-1 modes with static-shape regional compilation, then the
# full VTW tables (batch 1 and 16, 576 and 2304, static decode).
"$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py | tee out/gpu/tests.txt
"$PYTHON" benchmarks/bench_yopo.py | tee out/gpu/yopo.txt
"$PYTHON" benchmarks/bench_speed.py --compile-mode regional,reduce-overhead --batch 1 --visual 576 --no-static \
    --out out/gpu/speed_batch1_modes.json | tee out/gpu/speed_batch1_modes.txt
"$PYTHON" benchmarks/bench_speed.py --out out/gpu/speed.json "$@" | tee out/gpu/speed.txt
