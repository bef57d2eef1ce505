"""Streaming kernels over the vocabulary for a dense teacher (kd_loss and fused_linear_kd_loss),
also used for the student LSE of the sparse path, linear_topk and linear_sample.

Per row (docs/semantics.md), b = z_s / T, a = z_t / T, q = softmax(b), p = softmax(a):

  _lse_kernel          partial LSE(z/T), LSE(z), z[label] (and LSE(z/T) outside the k ids of a
                       sparse teacher, with z at the ids) over one vocabulary split.
                       Reads one model's rows: N*H + V*H elements (LM head) or N*V (logits);
                       writes 3 floats per (row, split).
  _dense_terms_kernel  partial sum_j f(p_j, q_j) and S = sum_j qh_j given the LSEs.
                       Reads both models' rows; writes 2 floats per (row, split).
                       AKL (DIV 6): the partial sum_j p (lp - lq), sum_j q (lq - lp) and
                       sum_j |p - q| instead (3 floats per (row, split)), from the same tiles.
  _dense_grad_kernel   g_j = grad_row * [kd_scale/T (qh_j - q_j S) + ce_w (softmax(z_s)_j - [j = y])]
                       * dz/dx_j for the columns [c_start, c_end); writes a (rows, c_end - c_start)
                       block of g in the output's dtype (the logits gradient itself for kd_loss, a
                       bounded vocabulary chunk for the LM-head losses).
                       AKL (DIV 6): qh_j = -w_h p_j + w_t q_j (lq_j - lp_j) with the row's
                       weights [w_h, w_t] read from akl_ptr (N, 2), S given in stats.

Splits of the vocabulary run as separate programs (grid axis 1) and are combined on the host by a
logsumexp / sum over the O(N * splits) partials, so results do not depend on scheduling.
Rows with grad_row == 0 get exactly 0 (NaN inputs included).
"""
import triton
import triton.language as tl

from .tl_utils import (NEG_INF, akl_terms, element_terms, first_id_at_least, grad_qh, head_tile, load_id,
                       lse_finish, lse_update)


@triton.jit
def _lse_kernel(x_ptr, stride_xn, stride_xv, w_ptr, stride_wv, b_ptr, H, cap, labels_ptr,
                lse_t_ptr, lse_1_ptr, pick_ptr, ids_ptr, stride_in, K, lse_o_ptr, zk_ptr,
                N, V, inv_T, cols_per_split, n_splits,
                LINEAR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
                IEEE: tl.constexpr, TWO: tl.constexpr, HAS_LABEL: tl.constexpr,
                HAS_IDS: tl.constexpr, KP: tl.constexpr, LOG_K: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """HAS_IDS (ids (N, K) ascending per row, empty slots (-1) last; KP = next_pow2(K),
    LOG_K = K.bit_length()): also z at the ids, picked from the same tiles (so they round exactly
    like the LSE's terms and the backward's recomputed tiles) and stored to zk (N, KP) at the id's
    slot by the one program whose tile holds it (slots of no id keep the host's zeros), and the LSE
    of z/T over the columns that are not among the ids (the sparse tail's log Q). A per-row cursor
    walks the sorted ids: a tile costs one compare pass per id it holds (the most any row holds)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    v0 = pid_s * cols_per_split
    v1 = tl.minimum(v0 + cols_per_split, V)
    m_t = tl.full((BLOCK_N,), NEG_INF, tl.float32)
    s_t = tl.zeros((BLOCK_N,), tl.float32)
    m_1 = tl.full((BLOCK_N,), NEG_INF, tl.float32)
    s_1 = tl.zeros((BLOCK_N,), tl.float32)
    pick = tl.zeros((BLOCK_N,), tl.float32)
    m_o = tl.full((BLOCK_N,), NEG_INF, tl.float32)
    s_o = tl.zeros((BLOCK_N,), tl.float32)
    cur = tl.zeros((BLOCK_N,), tl.int32)          # slot of the row's next id
    nxt = tl.zeros((BLOCK_N,), tl.int64)          # that id (2^31 - 1 when none is left)
    if HAS_IDS:
        cur = first_id_at_least(ids_ptr, stride_in, rows, rmask, K, v0, LOG_K)
        nxt = load_id(ids_ptr, stride_in, rows, rmask, cur, K)
    lab = tl.full((BLOCK_N,), -1, tl.int64)
    if HAS_LABEL:
        lab = tl.load(labels_ptr + rows, mask=rmask, other=-1)
    for c0 in range(v0, v1, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        valid = (cols < v1)[None, :]
        z = head_tile(x_ptr, stride_xn, stride_xv, w_ptr, stride_wv, b_ptr, H, cap, rows, cols, N, V,
                      LINEAR, HAS_BIAS, HAS_CAP, IEEE, BLOCK_N, BLOCK_V, BLOCK_H)
        zt = tl.where(valid, z * inv_T, NEG_INF)
        m_t, s_t = lse_update(m_t, s_t, zt)
        if HAS_IDS:
            c1 = tl.minimum(c0 + BLOCK_V, v1)
            in_k = tl.zeros((BLOCK_N, BLOCK_V), tl.int1)
            inside = nxt < c1                 # ids before c0 were consumed by earlier tiles
            while tl.max(inside.to(tl.int32), 0) > 0:
                hit = (cols[None, :] == nxt[:, None]) & inside[:, None]
                in_k = in_k | hit
                tl.store(zk_ptr + rows.to(tl.int64) * KP + cur, tl.sum(tl.where(hit, z, 0.0), 1),
                         mask=inside)
                cur += inside.to(tl.int32)
                nxt = load_id(ids_ptr, stride_in, rows, rmask, cur, K)
                inside = nxt < c1
            m_o, s_o = lse_update(m_o, s_o, tl.where(in_k, NEG_INF, zt))
        if TWO:
            m_1, s_1 = lse_update(m_1, s_1, tl.where(valid, z, NEG_INF))
        if HAS_LABEL:
            hit = valid & (cols[None, :] == lab[:, None])
            pick += tl.sum(tl.where(hit, z, 0.0), 1)
    out = rows * n_splits + pid_s
    tl.store(lse_t_ptr + out, lse_finish(m_t, s_t), mask=rmask)
    if TWO:
        tl.store(lse_1_ptr + out, lse_finish(m_1, s_1), mask=rmask)
    if HAS_LABEL:
        tl.store(pick_ptr + out, pick, mask=rmask)
    if HAS_IDS:
        tl.store(lse_o_ptr + out, lse_finish(m_o, s_o), mask=rmask)


@triton.jit
def _dense_terms_kernel(xs_ptr, s_sxn, s_sxv, ws_ptr, s_swv, bs_ptr, Hs, s_cap,
                        xt_ptr, t_sxn, t_sxv, wt_ptr, t_swv, bt_ptr, Ht, t_cap,
                        lse_b_ptr, lse_a_ptr, f_ptr, qh_ptr, tv_ptr, N, V, inv_T, LOG_W, LOG_1MW,
                        cols_per_split, n_splits, DIV: tl.constexpr, LINEAR: tl.constexpr,
                        S_BIAS: tl.constexpr, S_CAP: tl.constexpr, T_BIAS: tl.constexpr,
                        T_CAP: tl.constexpr, IEEE: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Partial sums over one vocabulary split into f (sum f), qh (S); for AKL (DIV 6) into
    f (forward KL), qh (reverse KL) and tv (sum |p - q|). tv_ptr is unused otherwise."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    v0 = pid_s * cols_per_split
    v1 = tl.minimum(v0 + cols_per_split, V)
    lse_b = tl.load(lse_b_ptr + rows, mask=rmask, other=0.0)
    lse_a = tl.load(lse_a_ptr + rows, mask=rmask, other=0.0)
    sf = tl.zeros((BLOCK_N,), tl.float32)
    sqh = tl.zeros((BLOCK_N,), tl.float32)
    stv = tl.zeros((BLOCK_N,), tl.float32)
    for c0 in range(v0, v1, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        valid = rmask[:, None] & (cols < v1)[None, :]
        zs = head_tile(xs_ptr, s_sxn, s_sxv, ws_ptr, s_swv, bs_ptr, Hs, s_cap, rows, cols, N, V,
                       LINEAR, S_BIAS, S_CAP, IEEE, BLOCK_N, BLOCK_V, BLOCK_H)
        zt = head_tile(xt_ptr, t_sxn, t_sxv, wt_ptr, t_swv, bt_ptr, Ht, t_cap, rows, cols, N, V,
                       LINEAR, T_BIAS, T_CAP, IEEE, BLOCK_N, BLOCK_V, BLOCK_H)
        lq = zs * inv_T - lse_b[:, None]
        lp = zt * inv_T - lse_a[:, None]
        if DIV == 6:   # akl: f <- forward KL, qh <- reverse KL, and the total variation
            f, qh, tv = akl_terms(lp, lq)
            stv += tl.sum(tl.where(valid, tv, 0.0), 1)
        else:
            f, qh = element_terms(lp, lq, DIV, LOG_W, LOG_1MW)
        sf += tl.sum(tl.where(valid, f, 0.0), 1)
        sqh += tl.sum(tl.where(valid, qh, 0.0), 1)
    out = rows * n_splits + pid_s
    tl.store(f_ptr + out, sf, mask=rmask)
    tl.store(qh_ptr + out, sqh, mask=rmask)
    if DIV == 6:
        tl.store(tv_ptr + out, stv, mask=rmask)


@triton.jit
def _dense_grad_kernel(xs_ptr, s_sxn, s_sxv, ws_ptr, s_swv, bs_ptr, Hs, s_cap,
                       xt_ptr, t_sxn, t_sxv, wt_ptr, t_swv, bt_ptr, Ht, t_cap,
                       labels_ptr, stats_ptr, akl_ptr, grad_rows_ptr, out_ptr, stride_on, stride_ov,
                       N, V, c_start, c_end, inv_T, kd_coef, ce_w, LOG_W, LOG_1MW,
                       DIV: tl.constexpr, HAS_KD: tl.constexpr, HAS_CE: tl.constexpr,
                       LINEAR: tl.constexpr, S_BIAS: tl.constexpr, S_CAP: tl.constexpr,
                       T_BIAS: tl.constexpr, T_CAP: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """stats rows: [LSE(b), LSE(z_s), LSE(a), S]; kd_coef = kd_scale / T; akl_ptr (N, 2) =
    [w_h, w_t] per row, read for DIV 6 only. labels: -1 no CE term; -2 (a vocabulary shard, shard.py)
    the CE softmax part without the one-hot, whose target lies in another shard."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cols = c_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cmask = cols < c_end
    zs = head_tile(xs_ptr, s_sxn, s_sxv, ws_ptr, s_swv, bs_ptr, Hs, s_cap, rows, cols, N, V,
                   LINEAR, S_BIAS, S_CAP, IEEE, BLOCK_N, BLOCK_V, BLOCK_H)
    g = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    if HAS_KD:
        zt = head_tile(xt_ptr, t_sxn, t_sxv, wt_ptr, t_swv, bt_ptr, Ht, t_cap, rows, cols, N, V,
                       LINEAR, T_BIAS, T_CAP, IEEE, BLOCK_N, BLOCK_V, BLOCK_H)
        lse_b = tl.load(stats_ptr + rows * 4 + 0, mask=rmask, other=0.0)
        lse_a = tl.load(stats_ptr + rows * 4 + 2, mask=rmask, other=0.0)
        S = tl.load(stats_ptr + rows * 4 + 3, mask=rmask, other=0.0)
        lq = zs * inv_T - lse_b[:, None]
        lp = zt * inv_T - lse_a[:, None]
        qh = grad_qh(lp, lq, akl_ptr, rows, rmask, DIV, LOG_W, LOG_1MW)
        g = (qh - tl.exp(lq) * S[:, None]) * kd_coef
    if HAS_CE:
        lab = tl.load(labels_ptr + rows, mask=rmask, other=-1)
        lse1 = tl.load(stats_ptr + rows * 4 + 1, mask=rmask, other=0.0)
        g += tl.where((lab != -1)[:, None], ce_w * tl.exp(zs - lse1[:, None]), 0.0)
        g -= tl.where(cols[None, :] == lab[:, None], ce_w, 0.0)
    if S_CAP:
        r = zs / s_cap
        g = g * (1.0 - r * r)
    gr = tl.load(grad_rows_ptr + rows, mask=rmask, other=0.0)
    g = tl.where((gr != 0)[:, None], g * gr[:, None], 0.0)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_on + (cols - c_start)[None, :] * stride_ov
    tl.store(ptrs, g.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _dense_fkl_kernel(xs_ptr, s_sxn, s_sxv, ws_ptr, s_swv, bs_ptr, Hs, s_cap,
                      xt_ptr, t_sxn, t_sxv, wt_ptr, t_swv, bt_ptr, Ht, t_cap, labels_ptr, part_ptr,
                      N, V, inv_T, cols_per_split, n_splits,
                      LINEAR: tl.constexpr, S_BIAS: tl.constexpr, S_CAP: tl.constexpr,
                      T_BIAS: tl.constexpr, T_CAP: tl.constexpr, IEEE: tl.constexpr,
                      TWO: tl.constexpr, HAS_LABEL: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Forward KL in one pass over both heads. With running maxima m_a, m_b and sums
    s_a = sum e^(a - m_a), s_b = sum e^(b - m_b), it keeps
        W = sum_j e^(a_j - m_a) ((a_j - m_a) - (b_j - m_b))      (terms with a_j = -inf are 0)
    re-centred whenever a maximum moves, so KL = W / s_a - log s_a + log s_b never subtracts two
    logit-sized numbers. part (7, N, splits) = [m_b, s_b, m_a, s_a, W, LSE(z_s), z_s[label]]."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    v0 = pid_s * cols_per_split
    v1 = tl.minimum(v0 + cols_per_split, V)
    m_b = tl.full((BLOCK_N,), NEG_INF, tl.float32)
    s_b = tl.zeros((BLOCK_N,), tl.float32)
    m_a = tl.full((BLOCK_N,), NEG_INF, tl.float32)
    s_a = tl.zeros((BLOCK_N,), tl.float32)
    W = tl.zeros((BLOCK_N,), tl.float32)
    m_1 = tl.full((BLOCK_N,), NEG_INF, tl.float32)
    s_1 = tl.zeros((BLOCK_N,), tl.float32)
    pick = tl.zeros((BLOCK_N,), tl.float32)
    lab = tl.full((BLOCK_N,), -1, tl.int64)
    if HAS_LABEL:
        lab = tl.load(labels_ptr + rows, mask=rmask, other=-1)
    for c0 in range(v0, v1, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        valid = (cols < v1)[None, :]
        zs = head_tile(xs_ptr, s_sxn, s_sxv, ws_ptr, s_swv, bs_ptr, Hs, s_cap, rows, cols, N, V,
                       LINEAR, S_BIAS, S_CAP, IEEE, BLOCK_N, BLOCK_V, BLOCK_H)
        zt = head_tile(xt_ptr, t_sxn, t_sxv, wt_ptr, t_swv, bt_ptr, Ht, t_cap, rows, cols, N, V,
                       LINEAR, T_BIAS, T_CAP, IEEE, BLOCK_N, BLOCK_V, BLOCK_H)
        b = tl.where(valid, zs * inv_T, NEG_INF)
        a = tl.where(valid, zt * inv_T, NEG_INF)
        ma_new = tl.maximum(m_a, tl.max(a, 1))
        mb_new = tl.maximum(m_b, tl.max(b, 1))
        ma_s = tl.where(ma_new == NEG_INF, 0.0, ma_new)
        mb_s = tl.where(mb_new == NEG_INF, 0.0, mb_new)
        scale_a = tl.exp(m_a - ma_s)
        # re-centre the old W on the new maxima (no old mass: nothing to move)
        shift = tl.where(s_a > 0, (m_a - ma_s) - (m_b - mb_s), 0.0)
        W = scale_a * (W + shift * s_a)
        ea = tl.exp(a - ma_s[:, None])
        term = tl.where(a > NEG_INF, ea * ((a - ma_s[:, None]) - (b - mb_s[:, None])), 0.0)
        W += tl.sum(term, 1)
        s_a = s_a * scale_a + tl.sum(ea, 1)
        s_b = s_b * tl.exp(m_b - mb_s) + tl.sum(tl.exp(b - mb_s[:, None]), 1)
        m_a = ma_new
        m_b = mb_new
        if TWO:
            m_1, s_1 = lse_update(m_1, s_1, tl.where(valid, zs, NEG_INF))
        if HAS_LABEL:
            hit = valid & (cols[None, :] == lab[:, None])
            pick += tl.sum(tl.where(hit, zs, 0.0), 1)
    out = rows * n_splits + pid_s
    plane = N * n_splits
    tl.store(part_ptr + out, m_b, mask=rmask)
    tl.store(part_ptr + plane + out, s_b, mask=rmask)
    tl.store(part_ptr + 2 * plane + out, m_a, mask=rmask)
    tl.store(part_ptr + 3 * plane + out, s_a, mask=rmask)
    tl.store(part_ptr + 4 * plane + out, W, mask=rmask)
    if TWO:
        tl.store(part_ptr + 5 * plane + out, lse_finish(m_1, s_1), mask=rmask)
    if HAS_LABEL:
        tl.store(part_ptr + 6 * plane + out, pick, mask=rmask)
