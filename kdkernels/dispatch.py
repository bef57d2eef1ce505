"""Backend selection: explicit argument, then env KDKERNELS_BACKEND, then "auto".

A backend module (kdkernels/backends/<name>/) exports the contract of docs/backends.md plus
`availability(device_type) -> None | reason`, and optionally `UNSUPPORTED_OPS`, the public ops it does
not implement yet (explicit requests for those raise NotImplementedError; "auto" skips the backend). An explicit request that cannot run raises with the
reason; "auto" never fails (the torch backend runs everywhere) and logs its choice once at debug level.
"""
from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Optional

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


def _reason(name: str, device_type: str, op: Optional[str] = None) -> Optional[str]:
    """None if backend `name` can run (op `op`) on `device_type` tensors, else why not."""
    try:
        mod = _module(name)
    except NotImplementedError as e:
        return str(e)
    except ImportError as e:  # e.g. triton not installed
        return f"importing it failed: {e}"
    if op is not None and op in getattr(mod, "UNSUPPORTED_OPS", ()):
        return f"it does not implement {op} yet"
    return mod.availability(device_type)


def available_backends(device_type: str = "cpu") -> list[str]:
    """Backends that can run on tensors of `device_type` ("cpu" or "cuda") right now."""
    return [b for b in BACKENDS if _reason(b, device_type) is None]


def _auto_order(device_type: str) -> tuple[str, ...]:
    # On CUDA the fused Triton kernels first; on CPU the native build only when it is already
    # built (availability() never starts a compile for "auto"), else the torch reference.
    return ("triton", "native", "torch") if device_type == "cuda" else ("native", "torch")


def resolve(backend: Optional[str], device_type: str, op: str) -> ModuleType:
    """The backend module to run `op` on tensors of `device_type`."""
    name = backend if backend is not None else os.environ.get("KDKERNELS_BACKEND", "auto")
    if name == "auto":
        for cand in _auto_order(device_type):
            mod_reason = (_reason(cand, device_type, op) if cand != "native"
                          else _native_auto_reason(device_type, op))
            if mod_reason is None:
                key = (cand, device_type, op)
                if key not in _logged:
                    _logged.add(key)
                    _log.debug("kdkernels: backend='auto' chose %r for %s on %s", cand, op, device_type)
                return _module(cand)
        raise AssertionError("the torch backend is always available")
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    mod = _module(name)  # NotImplementedError for a backend that does not exist yet
    if op in getattr(mod, "UNSUPPORTED_OPS", ()):
        raise NotImplementedError(f"backend={name!r} does not implement {op} yet")
    why = mod.availability(device_type)
    if why is not None:
        raise BackendUnavailable(f"backend={name!r} requested for {op} on {device_type} tensors, "
                                 f"but it cannot run: {why}")
    return mod


def _native_auto_reason(device_type: str, op: str) -> Optional[str]:
    """"auto" takes the native backend only if it is loadable without compiling."""
    try:
        mod = _module("native")
    except (NotImplementedError, ImportError) as e:
        return str(e)
    prebuilt = getattr(mod, "is_loaded_or_prebuilt", None)
    if prebuilt is None or not prebuilt():
        return "not built"
    return _reason("native", device_type, op)
