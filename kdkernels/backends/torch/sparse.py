"""Cached sparse teacher, torch reference: `fused_linear_sparse_kd_loss`.

Per row, with K the valid ids (id >= 0) and b = z_s / T (docs/semantics.md, "Sparse teacher"):
    bucket         : outcomes K + tail, P = 1 - sum_K p, Q = sum of q outside K, q from the full LSE(b)
    renorm_teacher : p renormalized over K, P = 0, q as in bucket
    renorm_both    : p and q renormalized over K, no tail
    D = sum_K f(p_i, q_i) + f(P, Q),   S = sum_K qh_i + qh(P, Q),   h_Q = qh(P, Q) / Q
    dD/db_j = q_j (h_Q - S) outside K, qh_j - q_j S at j in K   (renorm_both: 0 outside K)
Saved per row: stats = [LSE(b) (LSE over K for renorm_both), LSE(z_s), h_Q, S].
"""
from __future__ import annotations

import torch

from ...options import LOG_TAIL_FLOOR, KDOptions
from .common import acc_dtype, add_ce_grad, ce_rows, finish_grad, row_block
from .dense import alloc_head_grads, finish_head_grads, head_grads, linear_logits
from .terms import element_terms

_TEMPS = 6
_NEG_INF = float("-inf")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2."""
    x = x.clamp_max(0.0)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _masked_lse(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x.masked_fill(~valid, _NEG_INF), 1)


def teacher_logprobs(vals: torch.Tensor, valid: torch.Tensor, opts: KDOptions):
    """(lp_K, log P) per docs/semantics.md: renormalized where the tail mode asks, -inf at empty slots."""
    lp = vals.to(acc_dtype(vals))
    if opts.values == "weights":
        lp = torch.log(lp)
    lp = lp.masked_fill(~valid, _NEG_INF)
    if opts.values == "weights" or opts.tail != "bucket":
        if opts.tail != "bucket":
            lp = lp - _masked_lse(lp, valid).clamp_min(-1e30).unsqueeze(1)
        log_p_tail = torch.full_like(lp[:, 0], _NEG_INF)
    else:
        log_p_tail = log1mexp(_masked_lse(lp, valid)).clamp_min(LOG_TAIL_FLOOR)
    return lp, log_p_tail


def _sparse_terms(b, ids, vals, opts: KDOptions):
    """Everything per row that the loss and the gradient need, from the block's scaled logits b."""
    valid = ids >= 0
    bK = b.gather(1, ids.clamp_min(0))
    lpK, lP = teacher_logprobs(vals, valid, opts)
    full = valid.sum(1) == b.shape[1]          # K covers the vocabulary: no tail outcome
    if opts.tail == "renorm_both":
        lse = _masked_lse(bK, valid)
    else:
        lse = torch.logsumexp(b, 1)
    lqK = (bK - lse.unsqueeze(1)).masked_fill(~valid, _NEG_INF)
    fK, qhK = element_terms(lpK, lqK, opts)
    D, S = fK.sum(1), qhK.sum(1)
    hQ, in_k = torch.zeros_like(D), None
    if opts.tail != "renorm_both":
        in_k = ids_mask(ids, valid, b.shape)
        # log Q = log(1 - sum_K q) is accurate while Q >= 1/2; below, it cancels (to rounding noise
        # once Q < eps, and h_Q = qh(P, Q) / Q with it), so Q is summed over the tokens outside K.
        lQ = log1mexp(_masked_lse(lqK, valid))
        lQ_out = torch.logsumexp(b.masked_fill(in_k, _NEG_INF), 1) - lse
        lQ = torch.where(lQ < -0.6931471805599453, lQ_out, lQ).clamp_min(LOG_TAIL_FLOOR)
        fQ, qhQ = element_terms(lP.unsqueeze(1), lQ.unsqueeze(1), opts)
        no_tail = full.unsqueeze(1)
        fQ, qhQ = fQ.masked_fill(no_tail, 0.0).squeeze(1), qhQ.masked_fill(no_tail, 0.0).squeeze(1)
        D, S = D + fQ, S + qhQ
        hQ = qhQ * torch.exp(-lQ)
    return valid, lse, lqK, qhK, D, S, hQ, in_k


def ids_mask(ids: torch.Tensor, valid: torch.Tensor, shape) -> torch.Tensor:
    """(rows, V) bool: token j is one of the row's valid ids (empty slots write nothing)."""
    m = torch.zeros(shape, dtype=torch.uint8, device=ids.device)
    return m.scatter_reduce_(1, ids.clamp_min(0), valid.to(torch.uint8), "amax").bool()


def linear_sparse_kd_forward(hs, ws, bs, ids, vals, labels, opts: KDOptions):
    n, v = hs.shape[0], ws.shape[0]
    T = opts.temperature
    loss = hs.new_empty(n, dtype=acc_dtype(hs))
    stats = hs.new_empty(n, 4, dtype=acc_dtype(hs))
    step = row_block(n, v, opts.chunk_bytes, _TEMPS)
    for r in range(0, n, step):
        s = slice(r, r + step)
        z = linear_logits(hs[s], ws, bs, opts.student_softcap)
        lse1 = torch.logsumexp(z, 1) if opts.ce_weight else z.new_zeros(z.shape[0])
        row = z.new_zeros(z.shape[0])
        st = z.new_zeros(z.shape[0], 4)
        if opts.kd_weight:
            _, lse, _, _, D, S, hQ, _ = _sparse_terms(z / T, ids[s], vals[s], opts)
            row = opts.kd_scale * D
            st[:, 0], st[:, 2], st[:, 3] = lse, hQ, S
        if opts.ce_weight:
            row = row + opts.ce_weight * ce_rows(z, lse1, labels[s])
        st[:, 1] = lse1
        loss[s], stats[s] = row, st
    return loss, stats


def linear_sparse_kd_backward(hs, ws, bs, ids, vals, labels, stats, grad_rows, opts: KDOptions, need):
    n, v = hs.shape[0], ws.shape[0]
    T = opts.temperature
    dh, dw32, db32 = alloc_head_grads(hs, ws, need)
    step = row_block(n, v, opts.chunk_bytes, _TEMPS)
    for r in range(0, n, step):
        s = slice(r, r + step)
        z = linear_logits(hs[s], ws, bs, opts.student_softcap)
        g = torch.zeros_like(z)
        if opts.kd_weight:
            b = z / T
            valid, lse, lqK, qhK, _, _, _, in_k = _sparse_terms(b, ids[s], vals[s], opts)
            lse, hQ, S = stats[s, 0:1], stats[s, 2:3], stats[s, 3:4]
            idx = ids[s].clamp_min(0)
            if opts.tail != "renorm_both":
                # Outside K every token carries the tail's h_Q. At K that dense value is replaced,
                # not corrected: q_j (h_Q - S) + q_j (h_j - h_Q) cancels catastrophically when
                # |h_Q| >> 1 (forward KL: h_Q = -P/Q, huge when the student's tail << the teacher's).
                g = ((b - lse).exp() * (hQ - S)).masked_fill_(in_k, 0.0)
            g.scatter_add_(1, idx, (qhK - lqK.exp() * S).masked_fill(~valid, 0.0))
            g.mul_(opts.kd_scale / T)
        if opts.ce_weight:
            g = add_ce_grad(g, z, stats[s, 1], labels[s], opts.ce_weight)
        g = finish_grad(g, z, opts.student_softcap, grad_rows[s])
        head_grads(g, hs[s], ws, need, dh, dw32, db32, s, grad_rows[s])
    return finish_head_grads(dh, dw32, db32, ws, bs)
