"""The shard protocol of the triton backend: the per-rank passes of the vocabulary-parallel losses
(`process_group=`, kdkernels/distributed/vocab_parallel.py). The contract -- signatures, LOCAL labels
(>= 0 target here, -1 no CE term, -2 target in another shard), local ids (-1 elsewhere), the global
per-row stats [LSE(b) (over K for renorm_both), LSE(z_s), LSE(a) or h_Q, S], dh as the fp32 partial
g_shard @ W_shard -- is the docstring of kdkernels/distributed/shard_torch.py; this module runs it on
the single-process kernels, with the normalizers passed in instead of computed:

  *_shard_stats   _lse_kernel on the shard: per-row LSE(b), LSE(z_s), LSE(a) (dense teacher), the
                  CE target logit z_s[y] where y is local (0 elsewhere: labels < 0 never match a
                  column), and for a cached teacher z at the local ids (picked from the same tiles),
                  from which b_K and LSE over the local ids follow on the host (O(N k)).
                  Reads N*H + v*H per head (or N*v logits); writes O(N * splits + N * k).
  *_shard_terms   _dense_terms_kernel with the GLOBAL LSE(b), LSE(a): sum_j f(p_j, q_j) and
                  sum_j qh_j over the shard's columns. Reads both heads; writes O(N * splits).
  *_shard_backward _dense_grad_kernel / _sparse_grad_kernel with the global stats:
                  g_j = grad_row * dz/dx_j * [kd_scale/T (qh_j - q_j S) (+ the sparse tail's
                  q_j (h_Q - S) outside K) + ce_w (softmax(z_s)_j - [j = y])], the one-hot only where
                  y is local (label -2: softmax part only); then head_backward's chunked GEMMs give
                  dh (fp32 partial), dW and db of the shard. Memory as single-process: one
                  (N, chunk) gradient buffer within opts.chunk_bytes.

A rank holding no column (v = 0) returns LSE = -inf, zero sums and empty gradients without launching
anything. Statistics are fp32 (the kernels' accumulation type). divergence="akl" is not part of the
protocol (the frontend rejects it with process_group=).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton

from ...options import KDOptions
from .config import vocab_splits
from .dense_kernels import _dense_terms_kernel
from .losses import (Head, _dense_grad_launch, _div_code, _ieee, _mix_logs, _sorted_ids, _tiles,
                     head_backward, head_lse, linear_head, logits_head, sparse_grad_writer)

_F32 = torch.float32


def _no_akl(opts: KDOptions) -> None:
    if opts.divergence == "akl":
        raise NotImplementedError("the vocabulary-shard passes do not implement divergence='akl'")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(_F32).contiguous()


# --------------------------------------------------------------------------------------------------
# pass 1: per-row statistics of the shard


def _stats(s: Head, t: Optional[Head], n: int, v: int, labels: torch.Tensor, opts: KDOptions,
           ids: Optional[torch.Tensor] = None):
    """lse (N, 3) = [LSE(b), LSE(z_s) (0 without CE), LSE(a) (t given) or -inf], picked (N,), and with
    `ids` (local, -1 elsewhere) z at the ids in the caller's slot order (0 at other slots)."""
    _no_akl(opts)
    dev = labels.device
    has_ce = opts.ce_weight != 0
    lse = torch.full((n, 3), -math.inf, dtype=_F32, device=dev)
    picked = torch.zeros(n, dtype=_F32, device=dev)
    if not has_ce:
        lse[:, 1] = 0.0
    k = ids.shape[1] if ids is not None else 0
    zk = torch.zeros((n, k), dtype=_F32, device=dev) if ids is not None else None
    if n == 0 or v == 0:
        return lse, picked, zk
    T = opts.temperature
    ids_s, order = _sorted_ids(ids) if k else (None, None)
    lse_b, lse_1, pick, _, zs = head_lse(s, n, v, T, labels if has_ce else None,
                                         two=has_ce and T != 1.0, ids=ids_s)
    lse[:, 0] = lse_b
    if has_ce:
        lse[:, 1] = lse_1 if lse_1 is not None else lse_b
        picked = pick
    if t is not None:
        lse[:, 2] = head_lse(t, n, v, T, None, two=False)[0]
    if ids_s is not None:     # z at the sorted ids back to the caller's slot order
        zk.scatter_(1, order, zs[:, :k])
    return lse, picked, zk


def kd_shard_stats(zs, zt, labels, opts: KDOptions):
    n, v = zs.shape
    lse, picked, _ = _stats(logits_head(zs), logits_head(zt), n, v, labels, opts)
    return lse, picked


def linear_kd_shard_stats(hs, ws, bs, ht, wt, bt, labels, opts: KDOptions):
    n, v = hs.shape[0], ws.shape[0]
    if n == 0 or v == 0:
        return _stats(None, None, n, v, labels, opts)[:2]
    s = linear_head(hs, ws, bs, opts.student_softcap)
    t = linear_head(ht, wt, bt, opts.teacher_softcap)
    lse, picked, _ = _stats(s, t, n, v, labels, opts)
    return lse, picked


def linear_sparse_kd_shard_stats(hs, ws, bs, ids, labels, opts: KDOptions):
    """lse (N, 3) = [LSE(b), LSE(z_s), LSE(b) over the local ids], picked, bK (N, k) = b at the local
    ids (-inf at the other slots)."""
    n, v = hs.shape[0], ws.shape[0]
    s = linear_head(hs, ws, bs, opts.student_softcap) if n and v else None
    lse, picked, zk = _stats(s, None, n, v, labels, opts, ids.contiguous())
    bK = (zk / opts.temperature).masked_fill(ids < 0, -math.inf)
    lse[:, 2] = torch.logsumexp(bK, 1) if bK.shape[1] else -math.inf
    return lse, picked, bK


# --------------------------------------------------------------------------------------------------
# pass 2 (dense teacher): sum f and sum qh over the shard with the global normalizers


def _terms(s: Head, t: Head, n: int, v: int, glse: torch.Tensor, opts: KDOptions) -> torch.Tensor:
    _no_akl(opts)
    out = torch.zeros((n, 2), dtype=_F32, device=glse.device)
    if not opts.kd_weight or n == 0 or v == 0:
        return out
    dev = s.x.device
    tiles = _tiles(s)
    per, splits = vocab_splits(dev, n, v, tiles)
    part = torch.empty(2, n, splits, dtype=_F32, device=dev)
    lw, l1mw = _mix_logs(opts)
    grid = (triton.cdiv(n, tiles.block_n), splits)
    _dense_terms_kernel[grid](*s.args(), *t.args(), _f32(glse[:, 0]), _f32(glse[:, 2]), part[0],
                              part[1], part[1], n, v, 1.0 / opts.temperature, lw, l1mw, per, splits,
                              DIV=_div_code(opts), LINEAR=s.linear, S_BIAS=s.has_bias,
                              S_CAP=s.has_cap, T_BIAS=t.has_bias, T_CAP=t.has_cap, IEEE=_ieee(s),
                              **tiles.launch())
    return part.sum(2).T.contiguous()


def kd_shard_terms(zs, zt, glse, opts: KDOptions):
    n, v = zs.shape
    return _terms(logits_head(zs), logits_head(zt), n, v, glse, opts)


def linear_kd_shard_terms(hs, ws, bs, ht, wt, bt, glse, opts: KDOptions):
    n, v = hs.shape[0], ws.shape[0]
    if n == 0 or v == 0 or not opts.kd_weight:
        return torch.zeros((n, 2), dtype=_F32, device=glse.device)
    s = linear_head(hs, ws, bs, opts.student_softcap)
    t = linear_head(ht, wt, bt, opts.teacher_softcap)
    return _terms(s, t, n, v, glse, opts)


# --------------------------------------------------------------------------------------------------
# backward: the shard's logit gradient with the global per-row stats


def kd_shard_backward(zs, zt, labels, stats, grad_rows, opts: KDOptions):
    _no_akl(opts)
    n, v = zs.shape
    grad = torch.empty((n, v), dtype=zs.dtype, device=zs.device)
    if n and v:
        _dense_grad_launch(logits_head(zs), logits_head(zt), n, v, labels.contiguous(), _f32(stats),
                           _f32(grad_rows), opts, grad, 0, v)
    return grad


def _empty_head_grads(hs, ws, bs, need):
    """(dh partial, dW, db) of a shard without rows or columns: zeros / empty tensors."""
    dh = torch.zeros(hs.shape, dtype=_F32, device=hs.device) if need[0] else None
    dw = torch.zeros_like(ws, memory_format=torch.contiguous_format) if need[1] else None
    db = torch.zeros_like(bs) if need[2] else None
    return dh, dw, db


def linear_kd_shard_backward(hs, ws, bs, ht, wt, bt, labels, stats, grad_rows, opts: KDOptions, need):
    _no_akl(opts)
    n, v = hs.shape[0], ws.shape[0]
    if n == 0 or v == 0:
        return _empty_head_grads(hs, ws, bs, need)
    s = linear_head(hs, ws, bs, opts.student_softcap)
    t = linear_head(ht, wt, bt, opts.teacher_softcap)
    labels, stats, grad_rows = labels.contiguous(), _f32(stats), _f32(grad_rows)

    def write_chunk(g, c0, c1):
        _dense_grad_launch(s, t, n, v, labels, stats, grad_rows, opts, g, c0, c1)

    return head_backward(s.x, s.w, bs, need, opts, write_chunk, grad_rows, dh_fp32=True)


def linear_sparse_kd_shard_backward(hs, ws, bs, ids, lpK, labels, stats, grad_rows, opts: KDOptions,
                                    need):
    """lpK: the teacher's (renormalized) log-probs at the local slots, -inf elsewhere. Outside K every
    token of the shard carries q_j (h_Q - S) (0 for renorm_both), at the local ids qh_j - q_j S."""
    _no_akl(opts)
    n, v = hs.shape[0], ws.shape[0]
    if n == 0 or v == 0:
        return _empty_head_grads(hs, ws, bs, need)
    s = linear_head(hs, ws, bs, opts.student_softcap)
    labels, stats, grad_rows = labels.contiguous(), _f32(stats), _f32(grad_rows)
    ids_s, order = _sorted_ids(ids)
    if opts.kd_weight:
        lpk = _f32(lpK).gather(1, order)      # the grad kernel's sorted slot order
        if opts.tail == "renorm_both":
            dense = torch.zeros(n, dtype=_F32, device=hs.device)
        else:
            dense = (stats[:, 2] - stats[:, 3]) * (opts.kd_scale / opts.temperature)
    else:
        lpk = dense = stats                   # placeholders: HAS_KD is off
    write_chunk = sparse_grad_writer(s, n, v, ids_s, lpk, dense, labels, stats, None, grad_rows, opts)
    return head_backward(s.x, s.w, bs, need, opts, write_chunk, grad_rows, dh_fp32=True)
