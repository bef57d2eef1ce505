"""The `native` backend: the C++/CUDA kernels of csrc/ (docs/native.md), as the contract of
docs/backends.md. Importing this package loads nothing; the extension is found or built on the first
op call (see _loader.py). CPU tensors run the CPU build (C++/OpenMP), CUDA tensors the CUDA build;
both run the same math (csrc/include/kdkernels/).
"""
from __future__ import annotations

from typing import Optional

from ._loader import NativeBuildError, is_loaded_or_prebuilt as _prebuilt, missing_tools
from ._ops import (kd_backward, kd_forward, linear_kd_backward, linear_kd_forward, linear_kd_fused,
                   linear_sample, linear_sparse_kd_backward, linear_sparse_kd_forward,
                   linear_sparse_kd_fused, linear_topk)
from ._shard import (kd_shard_backward, kd_shard_stats, kd_shard_terms, linear_kd_shard_backward,
                     linear_kd_shard_stats, linear_kd_shard_terms, linear_sparse_kd_shard_backward,
                     linear_sparse_kd_shard_stats)

NAME = "native"
# Public ops not implemented yet (kdkernels.dispatch: an explicit request raises, "auto" skips us).
UNSUPPORTED_OPS = ()


def is_loaded_or_prebuilt() -> bool:
    """True when the CPU extension is loaded or loadable without compiling (dispatch "auto")."""
    return _prebuilt(False)


def availability(device_type: str) -> Optional[str]:
    """None when backend="native" can run on `device_type` tensors (possibly after a one-time JIT
    build), else the reason. Never compiles anything."""
    if device_type not in ("cpu", "cuda"):
        return f"no native kernels for device type {device_type!r}"
    cuda = device_type == "cuda"
    if not _prebuilt(cuda):
        why = missing_tools(cuda)
        if why is not None:
            return f"the extension is not built and cannot be: {why}"
    if cuda:
        import torch
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    return None


__all__ = ["kd_forward", "kd_backward", "linear_kd_forward", "linear_kd_backward",
           "linear_sparse_kd_forward", "linear_sparse_kd_backward", "linear_topk", "linear_sample",
           "linear_kd_fused", "linear_sparse_kd_fused", "availability", "is_loaded_or_prebuilt",
           "NativeBuildError", "NAME",
           # the shard protocol of the vocab-parallel losses (kdkernels/distributed/shard_torch.py)
           "kd_shard_stats", "kd_shard_terms", "kd_shard_backward", "linear_kd_shard_stats",
           "linear_kd_shard_terms", "linear_kd_shard_backward", "linear_sparse_kd_shard_stats",
           "linear_sparse_kd_shard_backward"]
