"""The shard protocol of the vocab-parallel losses (kdkernels/distributed/shard_torch.py, whose
docstring is the contract; docs/scaling.md) on the native kernels.

Forward passes are ops of their own (csrc/driver_shard.h): the lse epilogue over the shard's chunks
(stats), the dense-terms epilogue with the GLOBAL log-normalizers (terms). The backward passes are the
single-process backward ops, which already take per-row statistics, given the global ones, with
iopts[4] = 1 so that dh comes back as the accumulation-dtype partial g_shard @ W_shard (the caller
all-reduces it once). Two translations make the protocol's arguments theirs:

- labels: -2 (CE target in another shard) becomes a column past the shard, so the epilogue adds the
  softmax part of the CE gradient (its `label >= 0` test) and never meets the one-hot column;
- sparse teacher: the protocol gives the teacher's log-probabilities at the local slots (lpK); the
  backward op reads them as values="logprobs" with lnorm = 0, i.e. lp = lpK as given.

Rows with grad_rows == 0 may hold NaN hidden states: they are zeroed before the dW GEMM (their
logit gradient is exactly 0 already, but 0 * NaN would reach dW).
"""
from __future__ import annotations

import torch

from ...options import KDOptions
from ._ops import _grads, _ops, options_lists


def _labels(labels: torch.Tensor, width: int) -> torch.Tensor:
    """-2 (CE target elsewhere) -> `width`, a column the shard does not hold."""
    return torch.where(labels == -2, width, labels)


def _lists(opts: KDOptions, partial: bool = False, logprobs: bool = False):
    fopts, iopts = options_lists(opts)
    if logprobs:
        iopts[2] = 0
    return fopts, iopts + ([1] if partial else [])


def _masked_hidden(hs: torch.Tensor, grad_rows: torch.Tensor, need_dw: bool) -> torch.Tensor:
    if not need_dw:
        return hs
    return torch.where((grad_rows != 0).unsqueeze(1), hs, torch.zeros((), dtype=hs.dtype, device=hs.device))


# -- kd_loss (logits shards) -------------------------------------------------------------------------

def kd_shard_stats(zs, zt, labels, opts: KDOptions):
    return tuple(_ops(zs.device).kd_shard_stats(zs, zt, labels, *_lists(opts)))


def kd_shard_terms(zs, zt, glse, opts: KDOptions):
    return _ops(zs.device).kd_shard_terms(zs, zt, glse, *_lists(opts))


def kd_shard_backward(zs, zt, labels, stats, grad_rows, opts: KDOptions):
    return _ops(zs.device).kd_backward(zs, zt, _labels(labels, zs.shape[1]), stats, grad_rows,
                                       *_lists(opts), None)


# -- fused_linear_kd_loss (LM-head shards) -----------------------------------------------------------

def linear_kd_shard_stats(hs, ws, bs, ht, wt, bt, labels, opts: KDOptions):
    return tuple(_ops(hs.device).linear_kd_shard_stats(hs, ws, bs, ht, wt, bt, labels, *_lists(opts)))


def linear_kd_shard_terms(hs, ws, bs, ht, wt, bt, glse, opts: KDOptions):
    return _ops(hs.device).linear_kd_shard_terms(hs, ws, bs, ht, wt, bt, glse, *_lists(opts))


def linear_kd_shard_backward(hs, ws, bs, ht, wt, bt, labels, stats, grad_rows, opts: KDOptions, need):
    need = [bool(n) for n in need]
    out = _ops(hs.device).linear_kd_backward(
        _masked_hidden(hs, grad_rows, need[1]), ws, bs, ht, wt, bt, _labels(labels, ws.shape[0]), stats,
        grad_rows, *_lists(opts, partial=True), need, None)
    return _grads(out, need)


# -- fused_linear_sparse_kd_loss (student-head shards, local ids) ------------------------------------

def linear_sparse_kd_shard_stats(hs, ws, bs, ids, labels, opts: KDOptions):
    return tuple(_ops(hs.device).linear_sparse_kd_shard_stats(hs, ws, bs, ids, labels, *_lists(opts)))


def linear_sparse_kd_shard_backward(hs, ws, bs, ids, lpK, labels, stats, grad_rows, opts: KDOptions,
                                    need):
    """stats (N, 4) [lse, LSE(z_s), h_Q, S] (global) -> the op's (N, 5) with lnorm = 0."""
    need = [bool(n) for n in need]
    st = torch.cat([stats, stats.new_zeros(stats.shape[0], 1)], 1)
    out = _ops(hs.device).linear_sparse_kd_backward(
        _masked_hidden(hs, grad_rows, need[1]), ws, bs, ids, lpK, _labels(labels, ws.shape[0]), st,
        grad_rows, *_lists(opts, partial=True, logprobs=True), need, None)
    return _grads(out, need)
