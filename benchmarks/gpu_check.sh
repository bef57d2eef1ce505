#!/usr/bin/env bash
# One call on a lent GPU machine (H200): GPU tests, then GPU benchmarks, within 10 minutes.
#   bash benchmarks/gpu_check.sh [OUT_DIR]      (default: $OUT if set, else gpu-results)
# Each stage has its own time limit; a stage that fails or times out is reported and the next one
# still runs. Results: OUT_DIR/{env.txt, tests.log, gpu_kernels/, bench/, bench_compile/, summary.txt}.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-results}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export KDKERNELS_TEST_GPU=1   # tests/conftest.py: compiled Triton kernels, not the CPU interpreter
unset TRITON_INTERPRET
T0=$(date +%s)
summary="$OUT_DIR/summary.txt"
: > "$summary"

stage() {  # stage NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    local t=$(date +%s)
    echo "=== $name (limit ${limit}s) ===" | tee -a "$summary"
    timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $(( $(date +%s) - t ))s" | tee -a "$summary"
    tail -n 25 "$OUT_DIR/$name.log"
}

{ nvidia-smi || true; "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; "$PY" -c "import triton; print('triton', triton.__version__)" || true; git rev-parse HEAD || true; } > "$OUT_DIR/env.txt" 2>&1

# 1. GPU tests. The Triton interpreter tests set TRITON_INTERPRET=1 for their whole process, so the
#    Triton GPU tests run in a process of their own and the interpreter modules are never collected
#    with them; the native CUDA tests JIT-build the extension first (MAX_JOBS cores).
INTERP="--ignore=tests/test_triton_losses.py --ignore=tests/test_triton_heads.py"
stage tests_triton 100 "$PY" -m pytest tests/test_triton_gpu.py -q -p no:cacheprovider --durations=5
stage tests_native 200 env MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    "$PY" -m pytest tests/test_native_cuda.py -q -p no:cacheprovider --durations=5
stage tests_other 60 "$PY" -m pytest tests -q -p no:cacheprovider -m "not slow" -k "gpu or cuda" $INTERP \
    --ignore=tests/test_triton_gpu.py --ignore=tests/test_native_cuda.py --durations=5

# 2. The triton-backend kernel benchmark (issue 3), when present.
if [ -f benchmarks/gpu_kernels.py ]; then
    stage gpu_kernels 120 "$PY" benchmarks/gpu_kernels.py --quick --out "$OUT_DIR/gpu_kernels"
fi

# 3. The bench CLI: quick CUDA sweep of every provider except torch.compile ...
stage bench 100 "$PY" -m kdkernels bench --device cuda --out "$OUT_DIR/bench" \
    --providers naive kdkernels-torch kdkernels-triton kdkernels-native liger cce
# ... and torch.compile of naive at one training shape per op (each compile takes tens of seconds).
left=$(( 590 - ($(date +%s) - T0) ))
if [ "$left" -gt 40 ]; then
    stage bench_compile "$left" "$PY" -m kdkernels bench --device cuda --out "$OUT_DIR/bench_compile" \
        --providers naive_compile --n 8192 --v 128256 --modes fwd_bwd
fi
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$summary"
