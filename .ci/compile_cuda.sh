#!/usr/bin/env bash
# Compile the native backend's extensions (CPU build, then CUDA build for sm_80 + sm_90) on a machine
# without a GPU, with the same sources and flags as the JIT loader, and fail on any compile or link
# error. Nothing runs on a device. Output: a fresh cache directory ($KDKERNELS_CUDA_BUILD_DIR or a
# temporary one). Needs the CUDA build of torch, ninja and nvcc (CUDA_HOME, default /usr/local/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
export KDKERNELS_CACHE_DIR="${KDKERNELS_CUDA_BUILD_DIR:-$(mktemp -d)}"
export KDKERNELS_VERBOSE_BUILD="${KDKERNELS_VERBOSE_BUILD:-1}"
echo "compile_cuda: CUDA_HOME=$CUDA_HOME archs=$TORCH_CUDA_ARCH_LIST into $KDKERNELS_CACHE_DIR"
start=$(date +%s)
"$PY" - <<'PYEOF'
import sys
import torch
if torch.version.cuda is None:
    sys.exit("compile_cuda: this torch build has no CUDA; install the CUDA build of torch")
from kdkernels.backends.native import _loader
_loader.load(cuda=True)   # builds the CPU extension, then the CUDA one; raises on any error
print("compile_cuda: both extensions built and loaded (ops registered for CPU, Meta and CUDA)")
PYEOF
echo "compile_cuda: OK in $(( $(date +%s) - start )) s"
