"""Finding, building and loading the csrc extensions, lazily.

Order for each extension (CPU build, then CUDA build on top of it):
  1. already loaded in this process;
  2. built ahead of time by setup.py (module `kdkernels.<name>`);
  3. built before by the JIT into the versioned cache directory (loaded without running a compiler);
  4. JIT build with torch.utils.cpp_extension.load (ninja) into that directory, announced on stderr.
`is_loaded_or_prebuilt()` looks at 1-3 only and never compiles (dispatch "auto" uses it).
Cache directory: $KDKERNELS_CACHE_DIR, else $XDG_CACHE_HOME/kdkernels, else ~/.cache/kdkernels; one
subdirectory per (kdkernels version, torch version, Python version, hash of sources and flags).
"""
from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Optional

from . import build_config as cfg

_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}
_failed: dict[str, str] = {}


class NativeBuildError(RuntimeError):
    """The native extension could not be built or loaded; the message says why and where the log is."""


def _version() -> str:
    from ... import __version__  # the package's own constant (installed metadata may be stale)
    return __version__


def cache_root() -> Path:
    env = os.environ.get("KDKERNELS_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kdkernels"


def build_dir(cuda: bool) -> Path:
    import torch
    tag = (f"{_version()}-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-"
           f"{cfg.source_hash(cuda)}")
    return cache_root() / tag / ("cuda" if cuda else "cpu")


def _name(cuda: bool) -> str:
    return cfg.CUDA_NAME if cuda else cfg.CPU_NAME


def _prebuilt_spec(cuda: bool):
    try:
        return importlib.util.find_spec(f"kdkernels.{_name(cuda)}")
    except (ImportError, ValueError):
        return None


def _cached_library(cuda: bool) -> Optional[Path]:
    if not cfg.sources_present():
        return None
    so = build_dir(cuda) / f"{_name(cuda)}.so"
    return so if so.is_file() else None


def is_loaded_or_prebuilt(cuda: bool = False) -> bool:
    """True when the extension is loaded or loadable without compiling anything."""
    name = _name(cuda)
    return name in _loaded or _prebuilt_spec(cuda) is not None or _cached_library(cuda) is not None


def _import_path(name: str, path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, str(path), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def missing_tools(cuda: bool) -> Optional[str]:
    """Why a JIT build cannot even start here (None if it can)."""
    if not cfg.sources_present():
        return f"the csrc/ sources are not next to the package ({cfg.CSRC}); install from a checkout"
    if importlib.util.find_spec("ninja") is None and shutil.which("ninja") is None:
        return "ninja is not installed (pip install ninja)"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler found (set CXX or install g++)"
    if cuda:
        import torch
        if torch.version.cuda is None:
            return "this torch build has no CUDA"
        from torch.utils.cpp_extension import CUDA_HOME
        if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
            return "nvcc not found (set CUDA_HOME)"
    return None


def _seed_from_previous(out: Path) -> None:
    """Copy the newest earlier build of the same kind (other source hash) into `out`, so ninja
    recompiles only the sources whose content or headers changed (its .d files track headers)."""
    torch_py = out.parent.name.rsplit("-", 1)[0].split("-torch", 1)[-1]  # same torch and Python
    olds = [d / out.name for d in out.parent.parent.glob(f"*-torch{torch_py}-*")
            if d != out.parent and (d / out.name / "build.ninja").is_file()]
    if not olds:
        return
    src = max(olds, key=lambda d: d.stat().st_mtime)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.so", "lock"))


def _jit_build(cuda: bool) -> ModuleType:
    from torch.utils import cpp_extension
    name = _name(cuda)
    why = missing_tools(cuda)
    if why is not None:
        raise NativeBuildError(f"kdkernels native: cannot build the {'CUDA' if cuda else 'CPU'} "
                               f"extension: {why}")
    out = build_dir(cuda)
    if not out.exists():
        _seed_from_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    srcs = cfg.sources(cfg.CUDA_SOURCES if cuda else cfg.CPU_SOURCES)
    print(f"kdkernels: compiling the native {'CUDA' if cuda else 'CPU'} extension into {out} "
          f"(once per machine; a few minutes)...", file=sys.stderr,
          flush=True)
    t0 = time.time()
    kwargs = dict(name=name, sources=srcs, extra_include_paths=cfg.include_dirs(),
                  extra_cflags=cfg.CXX_FLAGS + cfg.CXX_FLAGS_JIT, extra_ldflags=cfg.LD_FLAGS,
                  build_directory=str(out), verbose=os.environ.get("KDKERNELS_VERBOSE_BUILD") == "1")
    if cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", cfg.cuda_archs())
        kwargs["extra_cuda_cflags"] = cfg.NVCC_FLAGS
    try:
        mod = cpp_extension.load(**kwargs)
    except Exception as e:  # compiler errors come as RuntimeError/CalledProcessError
        raise NativeBuildError(f"kdkernels native: building the {'CUDA' if cuda else 'CPU'} extension "
                               f"failed ({type(e).__name__}: {e}). Build directory: {out}; rerun with "
                               f"KDKERNELS_VERBOSE_BUILD=1 for the compiler output.") from e
    print(f"kdkernels: native {'CUDA' if cuda else 'CPU'} extension built in {time.time() - t0:.0f} s",
          file=sys.stderr, flush=True)
    return mod


def load(cuda: bool = False) -> ModuleType:
    """The extension module (CPU build; with cuda=True also the CUDA build), building it if needed."""
    import torch  # noqa: F401  (the extensions link against torch)
    name = _name(cuda)
    with _lock:
        if name in _loaded:
            return _loaded[name]
        if name in _failed:
            raise NativeBuildError(_failed[name])
        if cuda:
            _load_one(False)
        try:
            return _load_one(cuda)
        except NativeBuildError as e:
            _failed[name] = str(e)
            raise


def _load_one(cuda: bool) -> ModuleType:
    name = _name(cuda)
    if name in _loaded:
        return _loaded[name]
    if _prebuilt_spec(cuda) is not None:
        mod = importlib.import_module(f"kdkernels.{name}")
    elif _cached_library(cuda) is not None:
        mod = _import_path(name, _cached_library(cuda))
    else:
        mod = _jit_build(cuda)
    _loaded[name] = mod
    return mod
