"""Kernels of the cached sparse teacher (fused_linear_sparse_kd_loss), docs/semantics.md "Sparse".

Per row, K = valid ids (id >= 0) of k slots, b = z / T, z = softcap(h W^T + bias). The host sorts
each row's slots by id (empty slots last) once per forward and backward, so that the streaming
kernels visit a row's ids with a cursor (tl_utils.first_id_at_least / load_id). The logits at K, zK,
come from dense_kernels._lse_kernel (HAS_IDS), picked from the same tiles as the LSE.

  _sparse_rows_kernel  the k + 1 outcomes (bucket / renorm_teacher: K plus the tail P, Q with
                       Q = 1 - sum_K q from the full-vocabulary LSE(b) while Q >= 1/2, else the
                       student's mass summed outside K; renorm_both: K only):
                         D = sum_K f + f(P, Q),  S = sum_K qh + qh(P, Q),  h_Q = qh(P, Q) / Q
                       forward writes [LSE, D, S, h_Q]; with COEF it writes the backward's inputs:
                       the (renormalized) teacher log-probs at the k slots and the dense
                       coefficient kd_scale/T (h_Q - S) of the tokens outside K (0 for renorm_both).
                       O(k) per row.
                       AKL (DIV 6), forward only: the same outcomes give forward KL, reverse KL,
                       sum |p - q|, S_fkl = -sum p, the tail's h_Q of both KLs and lse_p; out is
                       (N, 8) then. The backward's COEF mode needs no AKL case: the host mixes
                       h_Q and S with the row weights first.
  _sparse_grad_kernel  g_j = grad_row * dz/dx_j * [kd_scale/T (qh_j - q_j S) at j in K,
                       dense_coef q_j outside K, + ce_w (softmax(z)_j - [j = y])] for columns
                       [c_start, c_end), recomputing the logit tile with tl.dot; K is marked in
                       the tile by a cursor over the row's sorted ids inside the tile's columns
                       (a bisection finds the first; one compare pass per id the tile holds; no
                       scatter, no atomics), so q_j and qh_j at K come from the recomputed tile
                       itself. Writes one (rows, cols) block.
                       AKL (DIV 6): qh_j = -w_h p_j + w_t q_j (lq_j - lp_j), [w_h, w_t] from akl_ptr.
"""
import triton
import triton.language as tl

from .tl_utils import (NEG_INF, akl_terms, element_terms, first_id_at_least, grad_qh, linear_tile, load_id,
                       log1mexp, masked_lse)


@triton.jit
def _sparse_rows_kernel(zk_ptr, ids_ptr, stride_in, vals_ptr, stride_vn, lse_ptr, lse_out_ptr,
                        stats_ptr, out_ptr, coef_ptr, dense_ptr, N, K, V, inv_T, kd_coef, LOG_W,
                        LOG_1MW, log_floor,
                        DIV: tl.constexpr, TAIL: tl.constexpr, WEIGHTS: tl.constexpr,
                        P_TAIL: tl.constexpr, COEF: tl.constexpr, BLOCK_N: tl.constexpr, KP: tl.constexpr):
    """TAIL: 0 bucket, 1 renorm_teacher, 2 renorm_both; P_TAIL = bucket and not WEIGHTS.
    Forward: lse_ptr = full-vocabulary LSE(b), lse_out_ptr = LSE(b) outside K; writes
    out (N, 4) = [LSE used for q, D, S, h_Q]; for AKL (DIV 6) out (N, 8) = [LSE used for q, KL(p||q),
    KL(q||p), sum |p - q|, S_fkl, h_Q of forward KL, h_Q of reverse KL, lse_p] (S_rkl = KL(q||p)).
    COEF (backward): lse_ptr = the saved LSE, h_Q and S read from stats (N, 4) = [LSE, LSE(z), h_Q,
    S]; writes coef (N, K) and dense (N,)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    slots = tl.arange(0, KP)
    m2 = rmask[:, None] & (slots < K)[None, :]
    ids = tl.load(ids_ptr + rows[:, None] * stride_in + slots[None, :], mask=m2, other=-1)
    valid = m2 & (ids >= 0)
    lp = tl.load(vals_ptr + rows[:, None] * stride_vn + slots[None, :], mask=valid, other=1.0).to(tl.float32)
    if WEIGHTS:
        lp = tl.log(lp)
    lp = tl.where(valid, lp, NEG_INF)
    lse_p = tl.zeros((BLOCK_N,), tl.float32)    # p_j = exp(u_j - lse_p) (AKL's public column)
    if TAIL != 0:   # renormalized teacher
        lse_p = tl.maximum(masked_lse(lp, valid, 1), -1e30)
        lp = lp - lse_p[:, None]
    if COEF:
        # the backward evaluates qh_j - q_j S at K inside its tiles, from these (renormalized)
        # teacher log-probs; outside K every token carries q_j (h_Q - S): the dense coefficient
        hQ = tl.load(stats_ptr + rows * 4 + 2, mask=rmask, other=0.0)
        S = tl.load(stats_ptr + rows * 4 + 3, mask=rmask, other=0.0)
        if TAIL == 2:
            dense = tl.zeros((BLOCK_N,), tl.float32)
        else:
            dense = (hQ - S) * kd_coef
        tl.store(coef_ptr + rows[:, None] * K + slots[None, :], lp, mask=m2)
        tl.store(dense_ptr + rows, dense, mask=rmask)
    else:
        bk = tl.load(zk_ptr + rows[:, None] * KP + slots[None, :], mask=m2, other=0.0) * inv_T
        if TAIL == 2:
            lse = masked_lse(bk, valid, 1)
        else:
            lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        lq = tl.where(valid, bk - lse[:, None], NEG_INF)
        # AKL: D <- KL(p||q), R <- KL(q||p), TV <- sum |p - q|, S <- S_fkl = -sum p
        R = tl.zeros((BLOCK_N,), tl.float32)
        TV = tl.zeros((BLOCK_N,), tl.float32)
        hQr = tl.zeros((BLOCK_N,), tl.float32)
        if DIV == 6:
            fk, rk, tvk = akl_terms(lp, lq)
            D = tl.sum(tl.where(valid, fk, 0.0), 1)
            R = tl.sum(tl.where(valid, rk, 0.0), 1)
            TV = tl.sum(tl.where(valid, tvk, 0.0), 1)
            S = tl.sum(tl.where(valid, -tl.exp(lp), 0.0), 1)
        else:
            fk, qhk = element_terms(lp, lq, DIV, LOG_W, LOG_1MW)
            fk = tl.where(valid, fk, 0.0)
            qhk = tl.where(valid, qhk, 0.0)
            D = tl.sum(fk, 1)
            S = tl.sum(qhk, 1)
        hQ = tl.zeros((BLOCK_N,), tl.float32)
        if TAIL != 2:
            if P_TAIL:  # bucket with log-prob values: the teacher's tail mass P = 1 - sum_K p,
                # in float64 (O(k) per row): when K holds nearly all the mass, P is below fp32's
                # resolution of 1 and terms like Q log(Q / P) would amplify the rounding noise
                lP = log1mexp(masked_lse(lp.to(tl.float64), valid, 1))
                lP = tl.maximum(lP, log_floor).to(tl.float32)
            else:
                lP = tl.full((BLOCK_N,), NEG_INF, tl.float32)
            full = tl.sum(valid.to(tl.int32), 1) == V   # K covers the vocabulary: no tail outcome
            # log Q = log(1 - sum_K q) while Q >= 1/2; below, that cancels, so Q is the student's
            # mass summed outside K (streamed by _lse_kernel)
            lQ = log1mexp(masked_lse(lq, valid, 1))
            lQ_out = tl.load(lse_out_ptr + rows, mask=rmask, other=0.0) - lse
            lQ = tl.maximum(tl.where(lQ < -0.6931471805599453, lQ_out, lQ), log_floor)
            if DIV == 6:   # the tail outcome of both KLs; qh_fkl(P, Q) = -P, qh_rkl = f_rkl
                fQ, rQ, tvQ = akl_terms(lP, lQ)
                qhQ = tl.where(full, 0.0, -tl.exp(lP))
                rQ = tl.where(full, 0.0, rQ)
                D += tl.where(full, 0.0, fQ)
                R += rQ
                TV += tl.where(full, 0.0, tvQ)
                S += qhQ
                hQ = qhQ * tl.exp(-lQ)
                hQr = rQ * tl.exp(-lQ)
            else:
                fQ, qhQ = element_terms(lP, lQ, DIV, LOG_W, LOG_1MW)
                fQ = tl.where(full, 0.0, fQ)
                qhQ = tl.where(full, 0.0, qhQ)
                D += fQ
                S += qhQ
                hQ = qhQ * tl.exp(-lQ)
        if DIV == 6:
            tl.store(out_ptr + rows * 8 + 0, lse, mask=rmask)
            tl.store(out_ptr + rows * 8 + 1, D, mask=rmask)
            tl.store(out_ptr + rows * 8 + 2, R, mask=rmask)
            tl.store(out_ptr + rows * 8 + 3, TV, mask=rmask)
            tl.store(out_ptr + rows * 8 + 4, S, mask=rmask)
            tl.store(out_ptr + rows * 8 + 5, hQ, mask=rmask)
            tl.store(out_ptr + rows * 8 + 6, hQr, mask=rmask)
            tl.store(out_ptr + rows * 8 + 7, lse_p, mask=rmask)
        else:
            tl.store(out_ptr + rows * 4 + 0, lse, mask=rmask)
            tl.store(out_ptr + rows * 4 + 1, D, mask=rmask)
            tl.store(out_ptr + rows * 4 + 2, S, mask=rmask)
            tl.store(out_ptr + rows * 4 + 3, hQ, mask=rmask)


@triton.jit
def _sparse_grad_kernel(h_ptr, stride_hn, w_ptr, stride_wv, b_ptr, H, cap, ids_ptr, stride_in,
                        lpk_ptr, dense_ptr, labels_ptr, stats_ptr, akl_ptr, grad_rows_ptr, out_ptr,
                        stride_on, N, V, K, c_start, c_end, inv_T, kd_coef, ce_w, LOG_W, LOG_1MW,
                        DIV: tl.constexpr,
                        HAS_KD: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_CE: tl.constexpr,
                        HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, IEEE: tl.constexpr,
                        LOG_K: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """stats rows: [LSE(b), LSE(z), h_Q, S] (LSE(b) over K for renorm_both); akl_ptr (N, 2) =
    [w_h, w_t], read for DIV 6 only. ids ascending per row, empty slots last; lpk in that slot
    order; LOG_K = K.bit_length(). labels: -1 no CE term; -2 (a vocabulary shard, shard.py) the CE
    softmax part without the one-hot."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = c_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = cols < c_end
    z = linear_tile(h_ptr, stride_hn, w_ptr, stride_wv, b_ptr, rows, cols, N, V, H, cap,
                    HAS_BIAS, HAS_CAP, IEEE, BLOCK_N, BLOCK_V, BLOCK_H)
    g = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if HAS_KD:
        in_k = tl.zeros((BLOCK_N, BLOCK_V), tl.int1)
        lp = tl.full((BLOCK_N, BLOCK_V), NEG_INF, tl.float32)
        c0 = c_start + pid_v * BLOCK_V
        c1 = tl.minimum(c0 + BLOCK_V, c_end)
        cur = first_id_at_least(ids_ptr, stride_in, rows, rmask, K, c0, LOG_K)
        nxt = load_id(ids_ptr, stride_in, rows, rmask, cur, K)
        inside = nxt < c1
        while tl.max(inside.to(tl.int32), 0) > 0:
            hit = (cols[None, :] == nxt[:, None]) & inside[:, None]
            lpi = tl.load(lpk_ptr + rows.to(tl.int64) * K + cur, mask=inside, other=NEG_INF)
            in_k = in_k | hit
            lp = tl.where(hit, lpi[:, None], lp)
            cur += inside.to(tl.int32)
            nxt = load_id(ids_ptr, stride_in, rows, rmask, cur, K)
            inside = nxt < c1
        lse = tl.load(stats_ptr + rows * 4 + 0, mask=rmask, other=0.0)
        S = tl.load(stats_ptr + rows * 4 + 3, mask=rmask, other=0.0)
        lq = z * inv_T - lse[:, None]
        q = tl.exp(lq)
        qh = grad_qh(lp, lq, akl_ptr, rows, rmask, DIV, LOG_W, LOG_1MW)
        gk = (qh - q * S[:, None]) * kd_coef
        if HAS_DENSE:
            dense = tl.load(dense_ptr + rows, mask=rmask, other=0.0)
            g = tl.where(in_k, gk, q * dense[:, None])
        else:
            g = tl.where(in_k, gk, 0.0)
    if HAS_CE:
        lab = tl.load(labels_ptr + rows, mask=rmask, other=-1)
        lse1 = tl.load(stats_ptr + rows * 4 + 1, mask=rmask, other=0.0)
        g += tl.where((lab != -1)[:, None], ce_w * tl.exp(z - lse1[:, None]), 0.0)
        g -= tl.where(cols[None, :] == lab[:, None], ce_w, 0.0)
    if HAS_CAP:
        r = z / cap
        g = g * (1.0 - r * r)
    gr = tl.load(grad_rows_ptr + rows, mask=rmask, other=0.0)
    g = tl.where((gr != 0)[:, None], g * gr[:, None], 0.0)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_on + (cols - c_start)[None, :]
    tl.store(ptrs, g.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
