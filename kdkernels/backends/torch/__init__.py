"""The `torch` backend: pure PyTorch, chunked, runs on any device. It is the reference semantics
(docs/semantics.md) that the triton and native backends are tested against.

Backend contract (every backend module exports these, no autograd inside; see docs/backends.md):
    kd_forward, kd_backward, linear_kd_forward, linear_kd_backward,
    linear_sparse_kd_forward, linear_sparse_kd_backward, linear_topk, linear_sample
and the optional fused pieces linear_kd_fused, linear_sparse_kd_fused.
"""
from .dense import kd_backward, kd_forward, linear_kd_backward, linear_kd_forward, linear_kd_fused
from .sparse import linear_sparse_kd_backward, linear_sparse_kd_forward, linear_sparse_kd_fused
from .topk import linear_sample, linear_topk

NAME = "torch"


def availability(device_type: str) -> str | None:
    """None when this backend can run on tensors of `device_type`, else the reason it cannot."""
    return None


__all__ = ["kd_forward", "kd_backward", "linear_kd_forward", "linear_kd_backward",
           "linear_sparse_kd_forward", "linear_sparse_kd_backward",
           "linear_kd_fused", "linear_sparse_kd_fused", "linear_topk", "linear_sample",
           "availability", "NAME"]
