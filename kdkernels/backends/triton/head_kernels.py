"""linear_topk and linear_sample kernels (docs/semantics.md), one program per block of rows
streaming the whole vocabulary; logit tiles z = softcap(h W^T + b) / T come from tl.dot.

_topk_kernel    running top-k per row plus the online LSE. A candidate is one int64 key,
                (order-preserving int32 image of the fp32 value) << 32 | (2^31 - 1 - id): keys are
                distinct, and larger key = larger value, then smaller id. Per row the KP best keys
                (KP = next power of two >= k) are kept unsorted; a tile's entries that beat the
                row's current k-th best replace it one at a time, largest first (the trip count is
                the most entries any row of the block admits, small after the first tiles).
                No tl.sort: the interpreter runs it ~1 s per call. The host sorts the N x KP keys.
                Reads N*H*splits + (N / BLOCK_N) * V*H elements; writes KP keys + 1 LSE per
                row and vocabulary split (grid axis 1), merged on the host.
_sample_kernel  loop 1: online LSE and the total mass sum_j exp(z_j - LSE) in fp64;
                loop 2: running fp64 CDF; draw r = #{j : CDF(j) <= u_r * total} (the smallest j with
                CDF(j) > u_r * total). The draws are sorted, so a per-row cursor walks them: a tile
                settles the draws whose threshold lies below the CDF at its end, one (rows, cols)
                compare each (the trip count is the most draws any row of the block has in the
                tile; most tiles have none), and writes each draw once. Draws left over (rounding
                put u_r * total at or past the row's final CDF) take the last id of nonzero
                probability, so rounding never draws a zero-probability token.
                Reads 2 (N*H + (N / BLOCK_N) V*H) elements; writes D ids + 1 LSE per row.
"""
import triton
import triton.language as tl

from .tl_utils import NEG_INF, linear_tile, lse_finish, lse_update

POS_INF = tl.constexpr(float("inf"))   # jit code reads only constexpr globals


@triton.jit
def _pack(z, cols):
    """int64 keys: larger value first, then smaller id; -0.0 counts as +0.0. Low 31 bits hold
    2^31 - 1 - id. Every real key, even of -inf (high word ordered(-inf) = -2139095041),
    exceeds keys with high words -2139095042 (sentinels) and -2139095043 (removed candidates)."""
    bits = (z + 0.0).to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)


@triton.jit
def _topk_kernel(h_ptr, stride_hn, w_ptr, stride_wv, b_ptr, H, cap, keys_ptr, lse_ptr, N, V,
                 inv_T, cols_per_split, n_splits, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
                 IEEE: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """One vocabulary split per program along grid axis 1: keys (N, splits, KP) and partial LSEs
    (N, splits), merged on the host."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    v0 = pid_s * cols_per_split
    v1 = tl.minimum(v0 + cols_per_split, V)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    slots = tl.arange(0, KP)
    m = tl.full((BLOCK_N,), NEG_INF, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    # distinct sentinels below every real key, so "the slot holding the row minimum" is unique;
    # removed candidates sink lower still
    best = (tl.full((BLOCK_N, KP), -2139095042, tl.int32).to(tl.int64) << 32) | slots.to(tl.int64)[None, :]
    lowest = tl.full((BLOCK_N, BLOCK_V), -2139095043, tl.int32).to(tl.int64) << 32
    for c0 in range(v0, v1, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        z = linear_tile(h_ptr, stride_hn, w_ptr, stride_wv, b_ptr, rows, cols, N, V, H, cap,
                        HAS_BIAS, HAS_CAP, IEEE, BLOCK_N, BLOCK_V, BLOCK_H) * inv_T
        z = tl.where((cols < v1)[None, :], z, NEG_INF)
        m, s = lse_update(m, s, z)
        # tile entries above the row's current k-th best enter one at a time, largest first,
        # each replacing the row's smallest kept key; rows with nothing left do nothing.
        kth = tl.min(best, 1)
        cand = _pack(z, cols)
        cand = tl.where(cand > kth[:, None], cand, lowest)
        n_in = tl.minimum(tl.max(tl.sum((cand != lowest).to(tl.int32), 1)), KP)
        for _ in range(0, n_in):
            top = tl.max(cand, 1)
            kth = tl.min(best, 1)
            take = (top > kth)[:, None] & (best == kth[:, None])
            best = tl.where(take, top[:, None], best)
            cand = tl.where(cand == top[:, None], lowest, cand)
    lse = lse_finish(m, s)
    out = rows * n_splits + pid_s
    tl.store(keys_ptr + out[:, None] * KP + slots[None, :], best, mask=rmask[:, None])
    tl.store(lse_ptr + out, lse, mask=rmask)


@triton.jit
def _threshold(u_ptr, stride_un, rows, rmask, cur, D, total):
    """u[row, cur] * total in fp64; +inf past the row's draws (never below a CDF)."""
    ok = rmask & (cur < D)
    u = tl.load(u_ptr + rows.to(tl.int64) * stride_un + cur, mask=ok, other=0.0)
    return tl.where(ok, u * total, POS_INF)


@triton.jit
def _sample_kernel(h_ptr, stride_hn, w_ptr, stride_wv, b_ptr, H, cap, u_ptr, stride_un, out_ptr,
                   lse_ptr, N, V, D, inv_T, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
                   IEEE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    m = tl.full((BLOCK_N,), NEG_INF, tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    m64 = tl.full((BLOCK_N,), NEG_INF, tl.float64)   # same max, fp64 sum: the total mass
    s64 = tl.zeros((BLOCK_N,), tl.float64)
    for c0 in range(0, V, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        z = linear_tile(h_ptr, stride_hn, w_ptr, stride_wv, b_ptr, rows, cols, N, V, H, cap,
                        HAS_BIAS, HAS_CAP, IEEE, BLOCK_N, BLOCK_V, BLOCK_H) * inv_T
        z = tl.where((cols < V)[None, :], z, NEG_INF)
        m, s = lse_update(m, s, z)
        m_new = tl.maximum(m64, tl.max(z, 1).to(tl.float64))
        ms = tl.where(m_new == NEG_INF, 0.0, m_new)
        s64 = s64 * tl.exp(m64 - ms) + tl.sum(tl.exp(z.to(tl.float64) - ms[:, None]), 1)
        m64 = m_new
    lse = lse_finish(m, s)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    lse64 = lse.to(tl.float64)
    total = s64 * tl.exp(tl.where(m64 == NEG_INF, 0.0, m64) - lse64)
    run = tl.zeros((BLOCK_N,), tl.float64)
    last = tl.zeros((BLOCK_N,), tl.int64)
    cur = tl.zeros((BLOCK_N,), tl.int32)          # draws settled so far, per row
    t = _threshold(u_ptr, stride_un, rows, rmask, cur, D, total)
    for c0 in range(0, V, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        z = linear_tile(h_ptr, stride_hn, w_ptr, stride_wv, b_ptr, rows, cols, N, V, H, cap,
                        HAS_BIAS, HAS_CAP, IEEE, BLOCK_N, BLOCK_V, BLOCK_H) * inv_T
        z = tl.where((cols < V)[None, :], z, NEG_INF)
        p = tl.exp(z.to(tl.float64) - lse64[:, None])
        cdf = tl.cumsum(p, axis=1) + run[:, None]
        run = tl.max(cdf, 1)
        last = tl.maximum(last, tl.max(tl.where(p > 0, cols[None, :], 0), 1).to(tl.int64))
        # every earlier column has CDF <= run before this tile <= t, so the draw is c0 + the
        # number of this tile's columns with CDF <= t (columns past V carry CDF = run > t)
        inside = t < run
        while tl.max(inside.to(tl.int32), 0) > 0:
            cnt = tl.sum((cdf <= t[:, None]).to(tl.int64), 1)
            tl.store(out_ptr + rows.to(tl.int64) * D + cur, c0 + cnt, mask=inside)
            cur += inside.to(tl.int32)
            t = _threshold(u_ptr, stride_un, rows, rmask, cur, D, total)
            inside = t < run
    for d0 in range(0, D, BLOCK_D):
        dr = d0 + tl.arange(0, BLOCK_D)
        left = rmask[:, None] & (dr < D)[None, :] & (dr[None, :] >= cur[:, None])
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + dr[None, :],
                 last[:, None] + tl.zeros((BLOCK_N, BLOCK_D), tl.int64), mask=left)
