"""Backend selection: explicit argument, then env KDKERNELS_BACKEND, then "auto".

A backend module (kdkernels/backends/<name>/) exports the contract of docs/backends.md plus
`availability(device_type) -> None | reason`, and optionally `UNSUPPORTED_OPS`, the public ops it does
not implement yet (explicit requests for those raise NotImplementedError; "auto" skips the backend),
and `FLOAT64` (default True), False when it would compute float64 inputs in a lower precision
(explicit requests with float64 tensors raise BackendUnavailable; "auto" skips the backend). An
explicit request that cannot run raises with the reason; "auto" never fails (the torch backend runs
everywhere) and logs its choice once at debug level.
"""
from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Optional

import torch

BACKENDS = ("torch", "triton", "native")
_log = logging.getLogger("kdkernels")
_logged: set = set()


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here; the message says why."""


def _module(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"kdkernels.backends.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"kdkernels.backends.{name}":
            raise NotImplementedError(f"backend={name!r} is not implemented yet") from None
        raise


def _dtype_reason(name: str, mod: ModuleType, dtype: Optional[torch.dtype]) -> Optional[str]:
    if dtype == torch.float64 and not getattr(mod, "FLOAT64", True):
        return (f"backend={name!r} computes in float32; float64 inputs need backend='torch' or "
                f"'native'")
    return None


def _reason(name: str, device_type: str, op: Optional[str] = None,
            dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None if backend `name` can run (op `op`, on `dtype` inputs) on `device_type` tensors, else
    why not."""
    try:
        mod = _module(name)
    except NotImplementedError as e:
        return str(e)
    except ImportError as e:  # e.g. triton not installed
        return f"importing it failed: {e}"
    if op is not None and op in getattr(mod, "UNSUPPORTED_OPS", ()):
        return f"it does not implement {op} yet"
    why = _dtype_reason(name, mod, dtype)
    return why if why is not None else mod.availability(device_type)


def available_backends(device_type: str = "cpu", dtype: Optional[torch.dtype] = None) -> list[str]:
    """Backends that can run on tensors of `device_type` ("cpu" or "cuda") right now (and compute
    `dtype` inputs in that dtype, when given)."""
    return [b for b in BACKENDS if _reason(b, device_type, dtype=dtype) is None]


# backend="auto": per device type and op, the backends in order of measured speed (fastest first; the
# torch backend, which runs everywhere, last). Each entry names the run it comes from; re-measure with
# `kdkernels bench` / benchmarks/gpu_check.sh and update the table, not a fixed preference.
#   cuda (H200, 2026-11-28, benchmarks/results/h200-2026-11-28, bf16 N=16384 H=4096 V=128256 k=64):
#     fused_linear_sparse_kd_loss fwd+bwd native 134 ms < triton 209; fused_linear_kd_loss (JSD) native
#     260 < triton 414; linear_topk native 85 < triton 137; linear_sample native 130 < triton 248;
#     kd_loss (N=4096) triton 3.2 ms < native 7.6.
#   cpu (docs/benchmarks.md, "CPU"): native (C++/OpenMP epilogues) < torch on every op; triton runs on
#     the CPU only in the interpreter, orders of magnitude slower: never chosen.
_MEASURED_ORDER = {
    ("cuda", "kd_loss"): ("triton", "native", "torch"),
    ("cuda", "fused_linear_kd_loss"): ("native", "triton", "torch"),
    ("cuda", "fused_linear_sparse_kd_loss"): ("native", "triton", "torch"),
    ("cuda", "linear_topk"): ("native", "triton", "torch"),
    ("cuda", "linear_sample"): ("native", "triton", "torch"),
}
_DEFAULT_ORDER = {"cuda": ("native", "triton", "torch"), "cpu": ("native", "torch")}


def _auto_order(device_type: str, op: str = "") -> tuple[str, ...]:
    """Candidates for "auto" (op as resolve() receives it; "(divergence='akl')" suffixes ignored). On
    the CPU the native build only when it is already built (availability() never compiles for auto)."""
    base = op.split("(")[0]
    return _MEASURED_ORDER.get((device_type, base), _DEFAULT_ORDER.get(device_type, ("torch",)))


def resolve(backend: Optional[str], device_type: str, op: str,
            dtype: Optional[torch.dtype] = None) -> ModuleType:
    """The backend module to run `op` on tensors of `device_type` whose compute dtype is `dtype` (the
    student's; None: not checked)."""
    name = backend if backend is not None else os.environ.get("KDKERNELS_BACKEND", "auto")
    if name == "auto":
        for cand in _auto_order(device_type, op):
            mod_reason = (_reason(cand, device_type, op, dtype) if cand != "native"
                          else _native_auto_reason(device_type, op, dtype))
            if mod_reason is None:
                key = (cand, device_type, op, dtype)
                if key not in _logged:
                    _logged.add(key)
                    _log.debug("kdkernels: backend='auto' chose %r for %s on %s (%s)", cand, op,
                               device_type, dtype)
                return _module(cand)
        raise AssertionError("the torch backend is always available")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    mod = _module(name)  # NotImplementedError for a backend that does not exist yet
    if op in getattr(mod, "UNSUPPORTED_OPS", ()):
        raise NotImplementedError(f"backend={name!r} does not implement {op} yet")
    why = _dtype_reason(name, mod, dtype)
    if why is not None:
        raise BackendUnavailable(f"{why} (requested for {op})")
    why = mod.availability(device_type)
    if why is not None:
        raise BackendUnavailable(f"backend={name!r} requested for {op} on {device_type} tensors, "
                                 f"but it cannot run: {why}")
    return mod


def _native_auto_reason(device_type: str, op: str, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """"auto" takes the native backend only if it is loadable without compiling."""
    try:
        mod = _module("native")
    except (NotImplementedError, ImportError) as e:
        return str(e)
    prebuilt = getattr(mod, "is_loaded_or_prebuilt", None)
    if prebuilt is None or not prebuilt():
        return "not built"
    return _reason("native", device_type, op, dtype)
