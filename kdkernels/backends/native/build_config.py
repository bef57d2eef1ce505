"""The one list of csrc/ sources and compiler flags, read by setup.py (ahead-of-time build) and by
the JIT loader (_loader.py). Plain data and path helpers only: importing this file needs no torch.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
CSRC = REPO / "csrc"

# Extension module names (setup.py builds them inside the package; the JIT loader uses the same names).
CPU_NAME = "kdkernels_native_cpu"
CUDA_NAME = "kdkernels_native_cuda"

CPU_SOURCES = ["bindings.cpp", "cpu/epilogue_cpu.cpp", "cpu/sample_cpu.cpp"]
CUDA_SOURCES = ["bindings_cuda.cpp", "cuda/epilogue_cuda.cu"]
CUDA_HEADERS = ["cuda/block.cuh"]
HEADERS = ["epilogue.h", "dispatch.h", "driver.h", "driver_fused.h", "driver_shard.h", "ops.h",
           "include/kdkernels/numeric.cuh", "include/kdkernels/divergence.cuh",
           "include/kdkernels/sparse_row.cuh", "include/kdkernels/topk.cuh"]
INCLUDE_DIRS = ["", "include"]  # relative to csrc/

CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]  # torch adds its own -std= (c++17 or c++20)
# Only for the JIT build, which runs where it was compiled (the AOT wheel stays portable).
CXX_FLAGS_JIT = ["-march=native"]
LD_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def sources(names) -> list[str]:
    return [str(CSRC / n) for n in names]


def include_dirs() -> list[str]:
    dirs = [str(CSRC / d) if d else str(CSRC) for d in INCLUDE_DIRS]
    # The pip CUDA build of torch keeps some CUDA headers (cusparse.h ...) in nvidia/cu13/include.
    try:
        import importlib.util
        spec = importlib.util.find_spec("nvidia")
        for base in (spec.submodule_search_locations or []) if spec else []:
            for sub in ("cu13", "cu12"):
                inc = Path(base) / sub / "include"
                if inc.is_dir():
                    dirs.append(str(inc))
    except (ImportError, ValueError):
        pass
    return dirs


@functools.lru_cache(maxsize=None)
def sources_present() -> bool:
    return all((CSRC / n).is_file() for n in CPU_SOURCES + HEADERS)


@functools.lru_cache(maxsize=None)
def source_hash(cuda: bool) -> str:
    """Hash of every source, header and flag of one extension: the cache directory key (computed
    once per process: dispatch "auto" asks on every call)."""
    h = hashlib.sha256()
    names = CPU_SOURCES + HEADERS + (CUDA_SOURCES + CUDA_HEADERS if cuda else [])
    for n in sorted(names):
        h.update(n.encode())
        h.update((CSRC / n).read_bytes())
    flags = CXX_FLAGS + CXX_FLAGS_JIT + LD_FLAGS + (NVCC_FLAGS + [cuda_archs()] if cuda else [])
    h.update(" ".join(flags).encode())
    return h.hexdigest()[:16]


def cuda_archs() -> str:
    return os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
