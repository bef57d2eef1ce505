"""Local vocabulary-shard passes, torch reference: the per-rank half of the vocab-parallel losses.

A rank holds the columns [v0, v1) of the vocabulary (logits columns, or LM-head rows). With b = z_s/T,
a = z_t/T over the GLOBAL vocabulary (docs/semantics.md), every quantity the loss needs is either a
log-sum-exp or a plain sum over columns, so it splits over shards:

    LSE(b) = LSE_r LSE_{j in shard r}(b_j)          (same for a, z_s, and b restricted to the ids K)
    D      = sum_r sum_{j in r} f(p_j, q_j),   S = sum_r sum_{j in r} qh_j,   z_s[y] = sum_r [y in r] z_s[y]

The passes below compute one shard's part; vocab_parallel.py combines them with all-reduces of O(N)
per row and hands the global per-row statistics back. This module is the shard protocol that any
backend may export to run under `process_group=` (docs/scaling.md):

    kd_shard_stats(zs, zt, labels, opts)                 -> lse (N,3) [b, z_s, a], picked (N,)
    kd_shard_terms(zs, zt, glse (N,3), opts)             -> (N,2) [sum f, sum qh] over the shard
    kd_shard_backward(zs, zt, labels, stats, grad_rows, opts) -> grad_zs (N,v)
    linear_kd_shard_stats / _terms / _backward           same with (hs, ws, bs, ht, wt, bt) instead
                                                         of logits; backward -> (dh partial f32, dw, db)
    linear_sparse_kd_shard_stats(hs, ws, bs, ids, labels, opts)
        -> lse (N,3) [b, z_s, b over the local ids], picked (N,), bK (N,k) f32 (-inf at non-local slots)
    linear_sparse_kd_shard_backward(hs, ws, bs, ids, lpK, labels, stats, grad_rows, opts, need)
        -> (dh partial f32, dw, db)

Conventions: `labels` are LOCAL column indices: >= 0 the CE target lies in this shard, -1 the row has
no CE term, -2 the row has a CE term whose target lies in another shard (softmax part only). `ids`
are local too, -1 for empty slots and ids of other shards. `stats` are the global per-row statistics
[LSE(b) (LSE over K for renorm_both), LSE(z_s), LSE(a) or h_Q, S]. dh is returned as the fp32 partial
sum g_shard @ W_shard; the caller all-reduces it once. Arithmetic is fp32 (fp64 inputs stay fp64,
as in the torch backend). Memory: (rows, v_shard) fp32 temporaries
within opts.chunk_bytes, as the torch backend; reads N*H + v*H per pass, writes O(N) (plus dh, dW).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backends.torch.common import acc, acc_dtype, finish_grad, row_block
from ..backends.torch.dense import alloc_head_grads, finish_head_grads, linear_logits
from ..backends.torch.terms import element_terms
from ..options import KDOptions

_TEMPS = 12
_NEG_INF = float("-inf")


def _lse(x: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x, 1)  # -inf for an empty shard


def _picked(z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """z[row, label] where the label is local (>= 0), else 0."""
    if z.shape[1] == 0:
        return z.new_zeros(z.shape[0])
    here = labels >= 0
    return torch.where(here, z.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1), 0.0)


def _ce_grad(g: torch.Tensor, z: torch.Tensor, lse1: torch.Tensor, labels: torch.Tensor,
             weight: float) -> torch.Tensor:
    """g += weight * (softmax(z)_j - [j = y]) with the global LSE(z_s); one-hot only where y is local."""
    has_ce = (labels != -1).unsqueeze(1)
    g = g + weight * torch.where(has_ce, (z - lse1.unsqueeze(1)).exp(), 0.0)
    if z.shape[1]:
        here = labels >= 0
        rows = torch.arange(g.shape[0], device=g.device)
        g.index_put_((rows, labels.clamp_min(0)), torch.where(here, -weight, 0.0).to(g.dtype),
                     accumulate=True)
    return g


# --------------------------------------------------------------------------------------------------
# Dense teacher. `blocks` yields (slice, zs, zt) with fp32 softcapped logits of the shard.


def _dense_stats(n, blocks, labels, opts: KDOptions, device, dtype):
    T = opts.temperature
    lse = torch.empty(n, 3, dtype=dtype, device=device)
    picked = torch.zeros(n, dtype=dtype, device=device)
    for s, zs, zt in blocks:
        lse[s, 0], lse[s, 2] = _lse(zs / T), _lse(zt / T)
        lse[s, 1] = _lse(zs) if opts.ce_weight else 0.0
        if opts.ce_weight:
            picked[s] = _picked(zs, labels[s])
    return lse, picked


def _dense_terms(n, blocks, glse, opts: KDOptions, device):
    T = opts.temperature
    out = torch.zeros(n, 2, dtype=glse.dtype, device=device)
    if not opts.kd_weight:
        return out
    for s, zs, zt in blocks:
        f, qh = element_terms(zt / T - glse[s, 2:3], zs / T - glse[s, 0:1], opts)
        out[s, 0], out[s, 1] = f.sum(1), qh.sum(1)
    return out


def _dense_grad(zs, zt, labels, stats, grad_rows, cap: Optional[float], opts: KDOptions):
    """d(loss)/d(pre-softcap student logits of the shard), one block, fp32."""
    T = opts.temperature
    g = torch.zeros_like(zs)
    if opts.kd_weight:
        lq = zs / T - stats[:, 0:1]
        _, qh = element_terms(zt / T - stats[:, 2:3], lq, opts)
        g = (qh - lq.exp() * stats[:, 3:4]) * (opts.kd_scale / T)
    if opts.ce_weight:
        g = _ce_grad(g, zs, stats[:, 1], labels, opts.ce_weight)
    return finish_grad(g, zs, cap, grad_rows)


def _logit_blocks(zs, zt, opts):
    n, v = zs.shape
    step = row_block(n, v, opts.chunk_bytes, _TEMPS)
    for r in range(0, n, step):
        s = slice(r, r + step)
        yield s, acc(zs[s]), acc(zt[s])


def _head_blocks(hs, ws, bs, ht, wt, bt, opts):
    n, v = hs.shape[0], ws.shape[0]
    step = row_block(n, v, opts.chunk_bytes, _TEMPS)
    for r in range(0, n, step):
        s = slice(r, r + step)
        yield (s, linear_logits(hs[s], ws, bs, opts.student_softcap),
               linear_logits(ht[s], wt, bt, opts.teacher_softcap))


def kd_shard_stats(zs, zt, labels, opts: KDOptions):
    return _dense_stats(zs.shape[0], _logit_blocks(zs, zt, opts), labels, opts, zs.device,
                        acc_dtype(zs))


def kd_shard_terms(zs, zt, glse, opts: KDOptions):
    return _dense_terms(zs.shape[0], _logit_blocks(zs, zt, opts), glse, opts, zs.device)


def kd_shard_backward(zs, zt, labels, stats, grad_rows, opts: KDOptions):
    grad = torch.empty_like(zs, memory_format=torch.contiguous_format)
    for s, bzs, bzt in _logit_blocks(zs, zt, opts):
        grad[s] = _dense_grad(bzs, bzt, labels[s], stats[s], grad_rows[s], None, opts)
    return grad


def linear_kd_shard_stats(hs, ws, bs, ht, wt, bt, labels, opts: KDOptions):
    return _dense_stats(hs.shape[0], _head_blocks(hs, ws, bs, ht, wt, bt, opts), labels, opts,
                        hs.device, acc_dtype(hs))


def linear_kd_shard_terms(hs, ws, bs, ht, wt, bt, glse, opts: KDOptions):
    return _dense_terms(hs.shape[0], _head_blocks(hs, ws, bs, ht, wt, bt, opts), glse, opts, hs.device)


def _partial_head_grads(g, h, w, need, dh32, dw32, db32, s, grad_rows):
    """dh32[s] = g @ W_shard (fp32 partial, summed over shards by the caller), dW += g^T h, db += sum g.
    Rows with grad_rows == 0 (ignored) may hold NaN hidden states: zeroed so 0 * NaN never reaches dW."""
    if need[0]:
        dh32[s] = acc(g.to(w.dtype) @ w)
    if need[1]:
        dw32.addmm_(g.T, torch.where((grad_rows != 0).unsqueeze(1), acc(h), 0.0))
    if need[2]:
        db32.add_(g.sum(0))


def _alloc(hs, ws, need):
    _, dw32, db32 = alloc_head_grads(hs, ws, (False, need[1], need[2]))
    dh32 = torch.zeros(hs.shape, dtype=acc_dtype(hs), device=hs.device) if need[0] else None
    return dh32, dw32, db32


def linear_kd_shard_backward(hs, ws, bs, ht, wt, bt, labels, stats, grad_rows, opts: KDOptions, need):
    dh32, dw32, db32 = _alloc(hs, ws, need)
    for s, zs, zt in _head_blocks(hs, ws, bs, ht, wt, bt, opts):
        g = _dense_grad(zs, zt, labels[s], stats[s], grad_rows[s], opts.student_softcap, opts)
        _partial_head_grads(g, hs[s], ws, need, dh32, dw32, db32, s, grad_rows[s])
    _, dw, db = finish_head_grads(None, dw32, db32, ws, bs)
    return dh32, dw, db


# --------------------------------------------------------------------------------------------------
# Sparse (cached) teacher: only the student head is sharded; ids are local (-1 elsewhere).


def _student_blocks(hs, ws, bs, opts, temps):
    n, v = hs.shape[0], ws.shape[0]
    step = row_block(n, v, opts.chunk_bytes, temps)
    for r in range(0, n, step):
        s = slice(r, r + step)
        yield s, linear_logits(hs[s], ws, bs, opts.student_softcap)


def _gather_local(b: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """b at the local ids, -inf at other slots."""
    if b.shape[1] == 0:
        return torch.full(ids.shape, _NEG_INF, dtype=b.dtype, device=b.device)
    return b.gather(1, ids.clamp_min(0)).masked_fill(ids < 0, _NEG_INF)


def linear_sparse_kd_shard_stats(hs, ws, bs, ids, labels, opts: KDOptions):
    n = hs.shape[0]
    T = opts.temperature
    dt = acc_dtype(hs)
    lse = torch.zeros(n, 3, dtype=dt, device=hs.device)
    picked = torch.zeros(n, dtype=dt, device=hs.device)
    bK = torch.empty(ids.shape, dtype=dt, device=hs.device)
    for s, z in _student_blocks(hs, ws, bs, opts, 6):
        b = z / T
        bK[s] = _gather_local(b, ids[s])
        lse[s, 0], lse[s, 2] = _lse(b), torch.logsumexp(bK[s], 1)
        if opts.ce_weight:
            lse[s, 1], picked[s] = _lse(z), _picked(z, labels[s])
    return lse, picked, bK


def linear_sparse_kd_shard_backward(hs, ws, bs, ids, lpK, labels, stats, grad_rows, opts: KDOptions,
                                    need):
    """dD/db_j = q_j (h_Q - S) on the shard plus (qh_j - q_j h_Q) at local ids; renorm_both:
    qh_j - q_j S at local ids only (q normalized over K, stats[:, 0] = LSE_K(b))."""
    T = opts.temperature
    dh32, dw32, db32 = _alloc(hs, ws, need)
    for s, z in _student_blocks(hs, ws, bs, opts, 6):
        g = torch.zeros_like(z)
        if opts.kd_weight and z.shape[1]:
            b = z / T
            lse, hQ, S = stats[s, 0:1], stats[s, 2:3], stats[s, 3:4]
            local = ids[s] >= 0
            lqK = (_gather_local(b, ids[s]) - lse)
            _, qhK = element_terms(lpK[s], lqK, opts)
            qK = lqK.exp()
            if opts.tail == "renorm_both":
                corr = qhK - qK * S
            else:
                g = (b - lse).exp() * (hQ - S)
                corr = qhK - qK * hQ
            g.scatter_add_(1, ids[s].clamp_min(0), corr.masked_fill(~local, 0.0))
            g.mul_(opts.kd_scale / T)
        if opts.ce_weight:
            g = _ce_grad(g, z, stats[s, 1], labels[s], opts.ce_weight)
        g = finish_grad(g, z, opts.student_softcap, grad_rows[s])
        _partial_head_grads(g, hs[s], ws, need, dh32, dw32, db32, s, grad_rows[s])
    _, dw, db = finish_head_grads(None, dw32, db32, ws, bs)
    return dh32, dw, db
