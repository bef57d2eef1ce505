"""The `triton` backend: fused streaming Triton kernels (docs/triton.md, contract in docs/backends.md).

Importing this package imports neither triton nor any kernel: Triton decides at decoration time
whether a kernel runs compiled (CUDA) or in its CPU interpreter (env TRITON_INTERPRET=1), so the
kernel modules load on first use, and `availability` reports when the mode they were loaded in
cannot serve the requested device.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Optional

NAME = "triton"
MAX_TOPK = 256   # linear_topk's largest k (heads.MAX_K; kept here so that reading it imports no kernel)
# Public ops not implemented yet (kdkernels.dispatch: an explicit request raises, "auto" skips us).
UNSUPPORTED_OPS: tuple = ()
# The kernels compute in float32 whatever the input dtype (kdkernels.dispatch: an explicit request
# with float64 inputs raises, "auto" skips us for them).
FLOAT64 = False
_KERNELS = ("losses", "heads", "shard")
_loaded_interpreted: Optional[bool] = None   # the TRITON_INTERPRET mode the kernels were built in


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def availability(device_type: str) -> Optional[str]:
    """None when this backend can run on tensors of `device_type`, else the reason it cannot."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if device_type == "cpu":
        if _loaded_interpreted is False:
            return ("its kernels were already loaded for CUDA (TRITON_INTERPRET was not set when they "
                    "were first used), so they cannot run on CPU tensors in this process")
        if not _interpret_env() and _loaded_interpreted is None:
            return ("Triton runs on CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before "
                    "the first triton-backend call")
        return None
    if device_type == "cuda":
        if _loaded_interpreted:
            return ("its kernels were loaded in interpreter mode (TRITON_INTERPRET=1), which cannot run "
                    "on CUDA tensors")
        import torch
        if not torch.cuda.is_available():
            return "CUDA is not available"
        return None
    return f"no Triton target for device type {device_type!r}"


def _kernels(name: str):
    """Import a kernel module on first use, remembering the interpreter mode."""
    global _loaded_interpreted
    mod = sys.modules.get(f"{__name__}.{name}")
    if mod is None:
        mod = importlib.import_module(f".{name}", __name__)
        if _loaded_interpreted is None:
            _loaded_interpreted = _interpret_env()
    return mod


def kd_forward(zs, zt, labels, opts):
    return _kernels("losses").kd_forward(zs, zt, labels, opts)


def kd_backward(zs, zt, labels, stats, grad_rows, opts, akl_weights=None):
    return _kernels("losses").kd_backward(zs, zt, labels, stats, grad_rows, opts, akl_weights)


def linear_kd_forward(hs, ws, bs, ht, wt, bt, labels, opts):
    return _kernels("losses").linear_kd_forward(hs, ws, bs, ht, wt, bt, labels, opts)


def linear_kd_backward(hs, ws, bs, ht, wt, bt, labels, stats, grad_rows, opts, need, akl_weights=None):
    return _kernels("losses").linear_kd_backward(hs, ws, bs, ht, wt, bt, labels, stats, grad_rows,
                                                 opts, need, akl_weights)


def linear_sparse_kd_forward(hs, ws, bs, ids, vals, labels, opts):
    return _kernels("losses").linear_sparse_kd_forward(hs, ws, bs, ids, vals, labels, opts)


def linear_sparse_kd_backward(hs, ws, bs, ids, vals, labels, stats, grad_rows, opts, need,
                              akl_weights=None):
    return _kernels("losses").linear_sparse_kd_backward(hs, ws, bs, ids, vals, labels, stats,
                                                        grad_rows, opts, need, akl_weights)


def linear_topk(h, w, bias, k, opts):
    return _kernels("heads").linear_topk(h, w, bias, k, opts)


def linear_sample(h, w, bias, uniforms, opts):
    return _kernels("heads").linear_sample(h, w, bias, uniforms, opts)


# The shard protocol of the vocab-parallel losses (process_group=; kdkernels/distributed/shard_torch.py
# is the contract): the per-rank passes, on the same kernels (shard.py).


def kd_shard_stats(zs, zt, labels, opts):
    return _kernels("shard").kd_shard_stats(zs, zt, labels, opts)


def kd_shard_terms(zs, zt, glse, opts):
    return _kernels("shard").kd_shard_terms(zs, zt, glse, opts)


def kd_shard_backward(zs, zt, labels, stats, grad_rows, opts):
    return _kernels("shard").kd_shard_backward(zs, zt, labels, stats, grad_rows, opts)


def linear_kd_shard_stats(hs, ws, bs, ht, wt, bt, labels, opts):
    return _kernels("shard").linear_kd_shard_stats(hs, ws, bs, ht, wt, bt, labels, opts)


def linear_kd_shard_terms(hs, ws, bs, ht, wt, bt, glse, opts):
    return _kernels("shard").linear_kd_shard_terms(hs, ws, bs, ht, wt, bt, glse, opts)


def linear_kd_shard_backward(hs, ws, bs, ht, wt, bt, labels, stats, grad_rows, opts, need):
    return _kernels("shard").linear_kd_shard_backward(hs, ws, bs, ht, wt, bt, labels, stats, grad_rows,
                                                      opts, need)


def linear_sparse_kd_shard_stats(hs, ws, bs, ids, labels, opts):
    return _kernels("shard").linear_sparse_kd_shard_stats(hs, ws, bs, ids, labels, opts)


def linear_sparse_kd_shard_backward(hs, ws, bs, ids, lpK, labels, stats, grad_rows, opts, need):
    return _kernels("shard").linear_sparse_kd_shard_backward(hs, ws, bs, ids, lpK, labels, stats,
                                                             grad_rows, opts, need)


__all__ = ["kd_forward", "kd_backward", "linear_kd_forward", "linear_kd_backward",
           "linear_sparse_kd_forward", "linear_sparse_kd_backward", "linear_topk", "linear_sample",
           "kd_shard_stats", "kd_shard_terms", "kd_shard_backward", "linear_kd_shard_stats",
           "linear_kd_shard_terms", "linear_kd_shard_backward", "linear_sparse_kd_shard_stats",
           "linear_sparse_kd_shard_backward", "availability", "NAME"]
