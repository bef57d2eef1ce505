"""Build hook. The package is pure Python; the native backend's extensions (csrc/) are added when
KDKERNELS_BUILD_CUDA allows:

  0      never (the native backend then compiles itself on first use, kdkernels/backends/native/)
  auto   (default) when torch is importable at build time (pip --no-build-isolation) and a C++
         compiler exists: the CPU extension, plus the CUDA extension when torch has CUDA, nvcc is
         found (CUDA_HOME) and a GPU is visible or TORCH_CUDA_ARCH_LIST is set
  1      both extensions, or fail with the reason

MAX_JOBS and TORCH_CUDA_ARCH_LIST (default "8.0;9.0") are honoured. Sources and flags come from
kdkernels/backends/native/build_config.py, the list the JIT loader uses too.
"""
import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent


def _config():
    spec = importlib.util.spec_from_file_location(
        "_kd_build_config", HERE / "kdkernels" / "backends" / "native" / "build_config.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _extensions():
    mode = os.environ.get("KDKERNELS_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"KDKERNELS_BUILD_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if mode == "1":
            raise SystemExit("KDKERNELS_BUILD_CUDA=1 needs torch at build time: "
                             "pip install --no-build-isolation -e .") from None
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        if mode == "1":
            raise SystemExit("KDKERNELS_BUILD_CUDA=1 but no C++ compiler was found (set CXX)")
        return [], {}
    cfg = _config()
    rel = lambda names: [os.path.relpath(p, HERE) for p in cfg.sources(names)]  # noqa: E731
    inc = cfg.include_dirs()
    exts = [CppExtension(f"kdkernels.{cfg.CPU_NAME}", rel(cfg.CPU_SOURCES), include_dirs=inc,
                         extra_compile_args=cfg.CXX_FLAGS, extra_link_args=cfg.LD_FLAGS)]
    nvcc = CUDA_HOME is not None and (Path(CUDA_HOME) / "bin" / "nvcc").exists()
    cuda_ok = torch.version.cuda is not None and nvcc
    if mode == "1" and not cuda_ok:
        raise SystemExit("KDKERNELS_BUILD_CUDA=1 but " + ("torch has no CUDA" if torch.version.cuda is None
                                                          else "nvcc was not found (set CUDA_HOME)"))
    if cuda_ok and (mode == "1" or "TORCH_CUDA_ARCH_LIST" in os.environ or torch.cuda.is_available()):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cfg.DEFAULT_CUDA_ARCHS)
        exts.append(CUDAExtension(f"kdkernels.{cfg.CUDA_NAME}", rel(cfg.CUDA_SOURCES), include_dirs=inc,
                                  extra_compile_args={"cxx": cfg.CXX_FLAGS, "nvcc": cfg.NVCC_FLAGS},
                                  extra_link_args=cfg.LD_FLAGS))
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
