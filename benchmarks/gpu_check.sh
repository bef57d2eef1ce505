#!/usr/bin/env bash
# One call on a lent GPU machine (H200): GPU tests, then GPU benchmarks, in about 7 minutes.
#   bash benchmarks/gpu_check.sh [OUT_DIR] [BUDGET_S]
# OUT_DIR (default: $OUT if set, else gpu-results) receives two files only, because the device tool
# returns at most 8: summary.txt and results.tar.gz (env.txt, every stage's log, the benchmark
# tables). The archive is rewritten after every stage, so a run cut short still returns what it did.
# Each stage has its own time limit; a stage that fails or times out is reported and the next one
# still runs. The native CUDA extension compiles in the background while the Triton tests run.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-results}}
BUDGET=${2:-420}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
WORK=$(mktemp -d /tmp/gpu-check.XXXX)
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export KDKERNELS_TEST_GPU=1   # tests/conftest.py: compiled Triton kernels, not the CPU interpreter
export MAX_JOBS=${MAX_JOBS:-14} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export KDKERNELS_CACHE_DIR=${KDKERNELS_CACHE_DIR:-$WORK/ext}
unset TRITON_INTERPRET
T0=$(date +%s)
summary="$OUT_DIR/summary.txt"
: > "$summary"

pack() { tar czf "$OUT_DIR/results.tar.gz" -C "$WORK" --exclude=ext . 2>/dev/null; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
stage() {  # stage NAME SECONDS CMD...   (SECONDS is capped by the budget left; SKIP="NAME ..." skips)
    local name=$1 limit=$2; shift 2
    case " ${SKIP:-} " in *" $name "*) echo "$name: skipped (SKIP)" | tee -a "$summary"; return;; esac
    local l=$(left); [ "$l" -lt "$limit" ] && limit=$l
    if [ "$limit" -lt 15 ]; then echo "$name: skipped (budget spent)" | tee -a "$summary"; return; fi
    local t=$(date +%s)
    echo "=== $name (limit ${limit}s) ===" | tee -a "$summary"
    timeout --signal=INT --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    echo "$name: rc=$rc in $(( $(date +%s) - t ))s" | tee -a "$summary"
    grep -E "passed|failed|error" "$WORK/$name.log" | tail -n 3 >> "$summary"
    tail -n 30 "$WORK/$name.log"
    pack
}

{ nvidia-smi || true; "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; "$PY" -c "import triton; print('triton', triton.__version__)" || true; cat .git-sha 2>/dev/null; } > "$WORK/env.txt" 2>&1
cat "$WORK/env.txt" | tail -n 4

# 0. The native CUDA (and CPU) extension build, in the background.
( t=$(date +%s); "$PY" -c "from kdkernels.backends.native import _loader; _loader.load(cuda=True)"; \
  echo "native build rc=$? in $(( $(date +%s) - t ))s" ) > "$WORK/native_build.log" 2>&1 &
BUILD=$!

# 1. GPU tests. The Triton interpreter tests set TRITON_INTERPRET=1 for their whole process, so the
#    Triton GPU tests run in a process of their own and the interpreter modules are never collected.
INTERP="--ignore=tests/test_triton_losses.py --ignore=tests/test_triton_heads.py"
stage tests_triton 110 "$PY" -m pytest tests/test_triton_gpu.py -q -p no:cacheprovider --durations=5
stage wait_build 150 bash -c "while kill -0 $BUILD 2>/dev/null; do sleep 2; done; cat $WORK/native_build.log"
stage tests_native 60 "$PY" -m pytest tests/test_native_cuda.py -q -p no:cacheprovider --durations=5
stage tests_other 45 "$PY" -m pytest tests -q -p no:cacheprovider -m "not slow" -k "gpu or cuda" $INTERP \
    --ignore=tests/test_triton_gpu.py --ignore=tests/test_native_cuda.py --durations=5

# 2. Kernel benchmarks at issue 3's shapes (bf16, N=16384, H=4096, V=128256, k=64), every provider
#    but torch.compile; then the bench CLI's quick CUDA sweep.
stage gpu_kernels ${KERNELS_LIMIT:-120} "$PY" benchmarks/gpu_kernels.py --out "$WORK/gpu_kernels" \
    --ops ${KERNEL_OPS:-sparse,dense,kd,topk,sample} --providers ${KERNEL_PROVIDERS:-naive,torch,triton,native,liger,gemm}
stage bench 60 "$PY" -m kdkernels bench --device cuda --out "$WORK/bench" \
    --providers naive kdkernels-torch kdkernels-triton kdkernels-native liger cce
# 3. Cache build overhead vs the teacher's forward (issue 4) with the SmolLM2-135M architecture at
#    random weights, when its config and tokenizer were carried (gpu_carry/smol, not in git).
if [ -f gpu_carry/smol/config.json ]; then
    for be in native triton; do
        stage cache_measure_$be ${MEASURE_LIMIT:-75} "$PY" -m kdkernels.cache.measure gpu_carry/smol \
            --random-init --device cuda --dtype bfloat16 --tokens ${MEASURE_TOKENS:-32768} --rounds 2 \
            --backend $be --out "$WORK/cm_$be"
    done
fi
[ -n "${EXTRA_STAGE:-}" ] && stage extra 120 bash -c "$EXTRA_STAGE"
echo "total $(( $(date +%s) - T0 ))s" | tee -a "$summary"
pack
