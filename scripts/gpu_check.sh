#!/usr/bin/env bash
# The GPU check: family exactness on CUDA against the CPU (tests/test_gpu.py), then the speed benchmarks (YOPO; VTW with
# whole-model, CUDA-graph and regional compilation and the static-cache decode).
# Runs with the Python on PATH (its own torch >= 2.9 with CUDA, transformers 5.x), from a source checkout, offline:
#   bash scripts/gpu_check.sh [extra benchmark args]      (or: make gpu-check)
#   GPU_OUT=dir (default out/gpu): where each step's output goes; STEP_TIMEOUT=seconds (default 900) per step;
#   GPU_STEPS="tests yopo ..." runs only those steps (default: all, in the order below).
# Without a CUDA device the tests skip and the benchmark runs its small CPU shape.
# Every step runs even when one before it fails or times out (a device session is short: keep what each one
# measured); the script exits non-zero if any step did.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT_DIR="${GPU_OUT:-out/gpu}"
STEP_TIMEOUT="${STEP_TIMEOUT:-900}"
GPU_STEPS="${GPU_STEPS:-tests yopo speed_batch1_modes profile speed static_methods static_deferred}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR"
failed=()

step() {  # step NAME COMMAND...: run it under the timeout, its output beside the others
    local name=$1
    shift
    case " $GPU_STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "== $name: $*"
    timeout "$STEP_TIMEOUT" "$@" 2>&1 | tee "$OUT_DIR/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name failed (exit $rc)"; failed+=("$name"); }
}

# The runs nothing has measured on a GPU yet come first: YOPO's dense / FlexAttention / split rows, then VTW's batch-1
# modes with static-shape regional compilation and CUDA graphs, then where VTW's time goes (busy against wall time and
# the top kernels: batch-1 prefill eager / compiled / CUDA graphs, static decode at 16 x 2304), then the full VTW
# tables (batch 1 and 16, 576 and 2304, static decode with each model's own peak beside the dynamic cache's), then
# static decode at 16 x 2304 under DivPrune (a reduction before the language model: every layer's cache shrinks), then
# the same static decode without and under VTW with generate's stop flag read one step late (no host sync per step):
# if VTW's ratio moves toward its bandwidth ratio there, the per-step sync is what diluted it.
step tests "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py
step yopo "$PYTHON" benchmarks/bench_yopo.py
step speed_batch1_modes "$PYTHON" benchmarks/bench_speed.py --compile-mode regional,reduce-overhead --batch 1 \
    --visual 576 --no-static --out "$OUT_DIR/speed_batch1_modes.json"
step profile "$PYTHON" benchmarks/profile_vtw.py --out "$OUT_DIR/profile.json"
step speed "$PYTHON" benchmarks/bench_speed.py --out "$OUT_DIR/speed.json" "$@"
step static_methods "$PYTHON" benchmarks/bench_speed.py --static-only --visual 2304 --batch 16 \
    --static-method divprune:keep=0.25 --out "$OUT_DIR/static_methods.json"
step static_deferred "$PYTHON" benchmarks/bench_speed.py --static-only --visual 2304 --batch 16 --deferred-stop \
    --out "$OUT_DIR/static_deferred.json"
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all steps passed"
