"""Cached sparse teacher, torch reference: `fused_linear_sparse_kd_loss`.

Per row, with K the valid ids (id >= 0) and b = z_s / T (docs/semantics.md, "Sparse teacher"):
    bucket         : outcomes K + tail, P = 1 - sum_K p, Q = sum of q outside K, q from the full LSE(b)
    renorm_teacher : p renormalized over K, P = 0, q as in bucket
    renorm_both    : p and q renormalized over K, no tail
    D = sum_K f(p_i, q_i) + f(P, Q),   S = sum_K qh_i + qh(P, Q),   h_Q = qh(P, Q) / Q
    dD/db_j = q_j (h_Q - S) outside K, qh_j - q_j S at j in K   (renorm_both: 0 outside K)
Each LSE is kept as two fp32 numbers hi + lo (common.lse_pair). Saved per row: stats = [LSE(b) (LSE over
K for renorm_both), LSE(z_s), h_Q, S, lo(b), lo(z_s)], the first two columns the hi parts.
divergence="akl" (docs/backends.md): loss = CE part only; stats (N, 13) =
[LSE(b), LSE(z_s), h_Q fkl, S fkl, h_Q rkl, S rkl, lo(b), lo(z_s), lse_p, lse_q, fkl, rkl, tv] over the
same outcomes; the backward mixes the two with the per-row weights [w_h, w_t].
Paths (docs/backends.md): forward + backward (the backward recomputes each block's logits), or fused
(scalar losses: the loss and the gradients from one GEMM of logits per block).
"""
from __future__ import annotations

import dataclasses

import torch

from ...options import LOG_TAIL_FLOOR, KDOptions
from .common import acc_dtype, add_ce_grad, ce_rows, finish_grad, log_softmax_pair, lse_pair, row_block
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
        # P = 1 - sum_K p in float64 (O(k) per row): when the k values hold nearly all the mass, P
        # is far below fp32's resolution of 1 and fp32 would round it to noise, which terms like
        # Q log(Q / P) (reverse KL) amplify.
        log_p_tail = log1mexp(_masked_lse(lp.double(), valid)).clamp_min(LOG_TAIL_FLOOR).to(lp.dtype)
    return lp, log_p_tail


def _k_terms(b, ids, valid, vals, lse, opts: KDOptions, akl_weights=None):
    """Per-row pieces at the k ids: (lqK, qhK, D_K, S_K, lP); cheap, O(rows * k). lse = (hi, lo)."""
    lpK, lP = teacher_logprobs(vals, valid, opts)
    lqK = log_softmax_pair(b.gather(1, ids.clamp_min(0)), *lse).masked_fill(~valid, _NEG_INF)
    fK, qhK = element_terms(lpK, lqK, opts, akl_weights)
    return lqK, qhK, fK.sum(1), qhK.sum(1), lP


def _student_lse(b, ids, valid, opts: KDOptions):
    """LSE(b) over the vocabulary, or over K for renorm_both, as lse_pair's (hi, lo)."""
    if opts.tail == "renorm_both":
        return lse_pair(b.gather(1, ids.clamp_min(0)).masked_fill(~valid, _NEG_INF))
    return lse_pair(b)


def _log_q_tail(b, ids, valid, lqK, lse):
    """log Q (docs/semantics.md): log1mexp(LSE_K(lq)) while Q >= 1/2; below, it cancels (to rounding
    noise once Q < eps, and h_Q = qh(P, Q) / Q with it), so those rows sum q over the tokens outside
    K. Only the rows that need it pay that extra pass (a host sync: forward only). lse = (hi, lo)."""
    lQ = log1mexp(_masked_lse(lqK, valid))
    low = lQ < -0.6931471805599453
    if bool(low.any()):
        rows = low.nonzero().squeeze(1)
        br = b[rows]
        br.masked_fill_(ids_mask(ids[rows], valid[rows], br.shape), _NEG_INF)
        hi, lo = lse_pair(br)
        lQ[rows] = (hi - lse[0][rows]) + (lo - lse[1][rows])
    return lQ.clamp_min(LOG_TAIL_FLOOR)


def _outcomes(b, ids, vals, opts: KDOptions):
    """The outcomes of the tail mode as log-probabilities: (lse, lpK, lqK, tail), tail = None for
    renorm_both, else (log P, log Q, rows where K covers the vocabulary: no tail outcome)."""
    valid = ids >= 0
    lse = _student_lse(b, ids, valid, opts)
    lpK, lP = teacher_logprobs(vals, valid, opts)
    lqK = log_softmax_pair(b.gather(1, ids.clamp_min(0)), *lse).masked_fill(~valid, _NEG_INF)
    tail = None
    if opts.tail != "renorm_both":
        tail = (lP, _log_q_tail(b, ids, valid, lqK, lse), valid.sum(1) == b.shape[1])
    return lse, lpK, lqK, tail


def _sums(lpK, lqK, tail, opts: KDOptions):
    """(D, S, h_Q) of opts.divergence over the outcomes."""
    fK, qhK = element_terms(lpK, lqK, opts)
    D, S = fK.sum(1), qhK.sum(1)
    hQ = torch.zeros_like(D)
    if tail is not None:
        lP, lQ, full = tail
        fQ, qhQ = element_terms(lP.unsqueeze(1), lQ.unsqueeze(1), opts)
        fQ = fQ.squeeze(1).masked_fill(full, 0.0)
        qhQ = qhQ.squeeze(1).masked_fill(full, 0.0)
        D, S = D + fQ, S + qhQ
        hQ = qhQ * torch.exp(-lQ)
    return D, S, hQ


def _sparse_forward_rows(b, ids, vals, opts: KDOptions):
    """(D, (hi, lo) of the LSE, h_Q, S) per row of the block's scaled logits b."""
    lse, lpK, lqK, tail = _outcomes(b, ids, vals, opts)
    D, S, hQ = _sums(lpK, lqK, tail, opts)
    return D, lse, hQ, S


def _akl_forward_rows(b, ids, vals, opts: KDOptions) -> torch.Tensor:
    """(rows, 11): [hi, h_Q fkl, S fkl, h_Q rkl, S rkl, lo, lse_p, lse_q, fkl, rkl, tv] (AKL's pieces)."""
    lse, lpK, lqK, tail = _outcomes(b, ids, vals, opts)
    f_kl, s_f, hq_f = _sums(lpK, lqK, tail, dataclasses.replace(opts, divergence="forward_kl"))
    r_kl, s_r, hq_r = _sums(lpK, lqK, tail, dataclasses.replace(opts, divergence="reverse_kl"))
    half_tv, _, _ = _sums(lpK, lqK, tail, dataclasses.replace(opts, divergence="tvd"))
    valid = ids >= 0
    hi, lo = lse
    if opts.tail == "bucket":
        lse_p = torch.zeros_like(hi)
    else:   # the log-normalizer teacher_logprobs subtracted from u = v (or log v)
        u = vals.to(hi.dtype)
        u = (torch.log(u) if opts.values == "weights" else u).masked_fill(~valid, _NEG_INF)
        lse_p = _masked_lse(u, valid).clamp_min(-1e30)
    return torch.stack([hi, hq_f, s_f, hq_r, s_r, lo, lse_p, hi + lo, f_kl, r_kl, 2 * half_tv], 1)


def ids_mask(ids: torch.Tensor, valid: torch.Tensor, shape) -> torch.Tensor:
    """(rows, V) bool: token j is one of the row's valid ids (empty slots write nothing)."""
    m = torch.zeros(shape, dtype=torch.uint8, device=ids.device)
    return m.scatter_reduce_(1, ids.clamp_min(0), valid.to(torch.uint8), "amax").bool()


def _scaled(z: torch.Tensor, T: float) -> torch.Tensor:
    return z if T == 1.0 else z / T


def _stats_width(opts: KDOptions) -> int:
    return 13 if opts.divergence == "akl" else 6


def _block_forward(z, ids, vals, labels, opts: KDOptions):
    """(loss, stats) of one block of fp32 student logits z (stats layout: module docstring)."""
    T = opts.temperature
    st = z.new_zeros(z.shape[0], _stats_width(opts))
    row = z.new_zeros(z.shape[0])
    if opts.divergence == "akl":      # the frontend (kdkernels/akl.py) forms the KD part from these
        parts = _akl_forward_rows(_scaled(z, T), ids, vals, opts)
        st[:, 0], st[:, 2:6], st[:, 6], st[:, 8:] = parts[:, 0], parts[:, 1:5], parts[:, 5], parts[:, 6:]
    elif opts.kd_weight:
        D, (st[:, 0], st[:, 4]), st[:, 2], st[:, 3] = _sparse_forward_rows(_scaled(z, T), ids, vals, opts)
        row = opts.kd_scale * D
    if opts.ce_weight:
        lo1 = 7 if opts.divergence == "akl" else 5
        lo_b = 6 if opts.divergence == "akl" else 4
        if opts.kd_weight and T == 1.0 and opts.tail != "renorm_both":    # LSE(z) is LSE(b)
            st[:, 1], st[:, lo1] = st[:, 0], st[:, lo_b]
        else:
            st[:, 1], st[:, lo1] = lse_pair(z)
        row = row + opts.ce_weight * ce_rows(z, (st[:, 1], st[:, lo1]), labels)
    return row, st


def _replace_at_ids(g, idx, valid, values):
    """g[row, idx] = values at the valid slots (ids are distinct within a row). Empty slots are
    pointed at the row's first valid slot with that slot's value, so the scatter has no conflicting
    duplicates; a row without valid ids rewrites its own value at column 0."""
    first = valid.long().argmax(1, keepdim=True)
    idx = torch.where(valid, idx, idx.gather(1, first))
    values = torch.where(valid, values, values.gather(1, first))
    values = torch.where(valid.any(1, keepdim=True), values, g.gather(1, idx))
    g.scatter_(1, idx, values)


def _block_grad(z, ids, vals, labels, st, grad_rows, opts: KDOptions, akl_weights=None):
    """d(loss)/d(pre-softcap logits) of one block of fp32 student logits z, weighted by grad_rows."""
    T = opts.temperature
    akl = opts.divergence == "akl"
    lo_b, lo1 = (6, 7) if akl else (4, 5)
    if opts.kd_weight:
        b = _scaled(z, T)
        lse, hQ, S = (st[:, 0], st[:, lo_b]), st[:, 2:3], st[:, 3:4]
        if akl:    # h_Q and S mix like the element terms
            hQ = (akl_weights * st[:, [2, 4]]).sum(1, keepdim=True)
            S = (akl_weights * st[:, [3, 5]]).sum(1, keepdim=True)
        valid = ids >= 0
        lqK, qhK, _, _, _ = _k_terms(b, ids, valid, vals, lse, opts, akl_weights)
        idx = ids.clamp_min(0)
        direct = (qhK - lqK.exp() * S).masked_fill(~valid, 0.0)
        if opts.tail == "renorm_both":
            g = torch.zeros_like(z).scatter_add_(1, idx, direct)
        else:
            # Outside K every token carries the tail's h_Q: q_j (h_Q - S). At K that value is
            # replaced by qh_j - q_j S, not corrected: q_j (h_Q - S) + q_j (h_j - h_Q) cancels
            # catastrophically when |h_Q| >> 1 (forward KL: h_Q = -P/Q, huge when the student's
            # tail << the teacher's).
            g = log_softmax_pair(b, *lse).exp_().mul_(hQ - S)
            _replace_at_ids(g, idx, valid, direct)
        g.mul_(opts.kd_scale / T)
    else:
        g = torch.zeros_like(z)
    if opts.ce_weight:
        g = add_ce_grad(g, z, (st[:, 1], st[:, lo1]), labels, opts.ce_weight)
    return finish_grad(g, z, opts.student_softcap, grad_rows)


def linear_sparse_kd_forward(hs, ws, bs, ids, vals, labels, opts: KDOptions):
    n, v = hs.shape[0], ws.shape[0]
    loss = hs.new_empty(n, dtype=acc_dtype(hs))
    stats = hs.new_empty(n, _stats_width(opts), dtype=acc_dtype(hs))
    step = row_block(n, v, opts.chunk_bytes, _TEMPS)
    for r in range(0, n, step):
        s = slice(r, r + step)
        z = linear_logits(hs[s], ws, bs, opts.student_softcap)
        loss[s], stats[s] = _block_forward(z, ids[s], vals[s], labels[s], opts)
    return loss, stats


def linear_sparse_kd_backward(hs, ws, bs, ids, vals, labels, stats, grad_rows, opts: KDOptions, need,
                              akl_weights=None):
    n, v = hs.shape[0], ws.shape[0]
    dh, dw32, db32 = alloc_head_grads(hs, ws, need)
    step = row_block(n, v, opts.chunk_bytes, _TEMPS)
    for r in range(0, n, step):
        s = slice(r, r + step)
        z = linear_logits(hs[s], ws, bs, opts.student_softcap)
        g = _block_grad(z, ids[s], vals[s], labels[s], stats[s], grad_rows[s], opts,
                        None if akl_weights is None else akl_weights[s])
        head_grads(g, hs[s], ws, need, dh, dw32, db32, s, grad_rows[s])
    return finish_head_grads(dh, dw32, db32, ws, bs)


def linear_sparse_kd_fused(hs, ws, bs, ids, vals, labels, grad_rows, opts: KDOptions, need):
    """Loss and gradients in one pass (docs/backends.md, "Fused path"): per block of rows one GEMM of
    logits, the loss and the logit gradient from it (weighted by grad_rows), then dH and dW. Gradients
    in the accumulation dtype (the frontend scales them, then rounds once)."""
    n, v = hs.shape[0], ws.shape[0]
    loss = hs.new_empty(n, dtype=acc_dtype(hs))
    dh, dw32, db32 = alloc_head_grads(hs, ws, need, acc_out=True)
    step = row_block(n, v, opts.chunk_bytes, _TEMPS)
    for r in range(0, n, step):
        s = slice(r, r + step)
        z = linear_logits(hs[s], ws, bs, opts.student_softcap)
        loss[s], st = _block_forward(z, ids[s], vals[s], labels[s], opts)
        g = _block_grad(z, ids[s], vals[s], labels[s], st, grad_rows[s], opts)
        head_grads(g, hs[s], ws, need, dh, dw32, db32, s, grad_rows[s])
    return loss, dh, dw32, db32
