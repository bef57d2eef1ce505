"""Which module computes the local shard passes under `process_group=`.

A backend plugs into the vocab-parallel losses by exporting the shard protocol of shard_torch.py
(`kd_shard_*`, `linear_kd_shard_*`, `linear_sparse_kd_shard_*`). Resolution follows kdkernels.dispatch:
an explicit backend must export the passes for the op, else BackendUnavailable says so (no silent
fallback); backend="torch" means the torch reference passes of kdkernels.distributed.shard_torch;
"auto" takes the backend that "auto" picks when it exports the passes, else the torch reference.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

from ..dispatch import BackendUnavailable, resolve
from . import shard_torch

SHARD_OPS = {
    "kd_loss": ("kd_shard_stats", "kd_shard_terms", "kd_shard_backward"),
    "fused_linear_kd_loss": ("linear_kd_shard_stats", "linear_kd_shard_terms",
                             "linear_kd_shard_backward"),
    "fused_linear_sparse_kd_loss": ("linear_sparse_kd_shard_stats", "linear_sparse_kd_shard_backward"),
}


def _exports(mod: ModuleType, op: str) -> bool:
    return all(callable(getattr(mod, f, None)) for f in SHARD_OPS[op])


def resolve_shard(backend: Optional[str], device_type: str, op: str) -> ModuleType:
    name = backend if backend is not None else os.environ.get("KDKERNELS_BACKEND", "auto")
    mod = resolve(name, device_type, op)  # raises for an unknown/unavailable explicit backend
    if name == "torch":
        return shard_torch
    if _exports(mod, op):
        return mod
    if name == "auto":
        return shard_torch
    raise BackendUnavailable(
        f"backend={name!r} requested for vocab-parallel {op} (process_group=...), but it does not "
        f"export the shard passes {SHARD_OPS[op]} (docs/scaling.md); use backend='torch' or 'auto'")
