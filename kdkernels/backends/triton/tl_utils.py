"""Triton device helpers shared by every kernel of the triton backend.

    logit tiles    z = softcap(h W^T + b) for a (rows, cols) block, fp32 accumulation (tl.dot),
                   or a block loaded from a logits tensor
    online LSE     (m, s) with LSE = m + log s, updated tile by tile
    element terms  f(p, q) and qh = q df/dq per divergence, in log space: the Triton twin of
                   kdkernels/backends/torch/terms.py (docs/semantics.md, "Divergences")
    log1mexp, logaddexp, expm1/log1p (Kahan's tricks: the core language has neither)

Divergence codes (constexpr DIV) follow kdkernels.options.DIVERGENCES:
    0 forward_kl, 1 reverse_kl, 2 jsd, 3 skew_forward_kl, 4 skew_reverse_kl, 5 tvd, 6 akl
AKL (6) is not an element divergence of its own: its forward streams the forward KL, reverse KL and
sum |p - q| elements (akl_terms), its backward mixes two qh with per-row weights (akl_qh); the
kernels branch on DIV == 6 before element_terms, which never sees it.
Mixing weights travel as LOG_W = log w and LOG_1MW = log(1 - w) with w = beta (jsd) or alpha (skew).
"""
import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))   # jit code reads only constexpr globals


# ------------------------------------------------------------------------------------------------
# scalar math


@triton.jit
def expm1(x):
    """exp(x) - 1 accurate near 0: (u - 1) * x / log(u), u = exp(x) (Kahan)."""
    u = tl.exp(x)
    um1 = u - 1.0
    safe = (u != 1.0) & (um1 != -1.0)
    return tl.where(safe, um1 * x / tl.log(tl.where(safe, u, 2.0)), tl.where(u == 1.0, x, um1))


@triton.jit
def log1p(y):
    """log(1 + y) accurate near 0: y * log(u) / (u - 1), u = 1 + y (Kahan)."""
    u = 1.0 + y
    safe = u != 1.0
    return tl.where(safe, y * tl.log(u) / tl.where(safe, u - 1.0, 1.0), y)


@triton.jit
def log1mexp(x):
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (x = -inf gives 0)."""
    x = tl.minimum(x, 0.0)
    return tl.where(x > -0.6931471805599453, tl.log(-expm1(x)), log1p(-tl.exp(x)))


@triton.jit
def logaddexp(x, y):
    """log(exp x + exp y); -inf when both are -inf."""
    m = tl.maximum(x, y)
    d = tl.where(m == NEG_INF, NEG_INF, tl.minimum(x, y) - m)
    return m + log1p(tl.exp(d))


@triton.jit
def softcap(x, cap):
    """c * tanh(x / c) with tanh(t) = 1 - 2 / (exp(2t) + 1) (saturates cleanly at +-inf)."""
    return cap * (1.0 - 2.0 / (tl.exp(2.0 * x / cap) + 1.0))


# ------------------------------------------------------------------------------------------------
# online log-sum-exp over the vocabulary, rowwise on a (rows, cols) tile


@triton.jit
def lse_update(m, s, x):
    """Fold tile x (rows, cols; -inf at masked entries) into the running (max m, scaled sum s)."""
    m_new = tl.maximum(m, tl.max(x, 1))
    ms = tl.where(m_new == NEG_INF, 0.0, m_new)
    s = s * tl.exp(m - ms) + tl.sum(tl.exp(x - ms[:, None]), 1)
    return m_new, s


@triton.jit
def lse_finish(m, s):
    """m + log s; -inf for a row that saw only -inf."""
    return tl.where(m == NEG_INF, NEG_INF, m + tl.log(s))


@triton.jit
def masked_lse(x, valid, axis: tl.constexpr):
    """LSE of x over `axis` where valid, -inf when nothing is valid."""
    x = tl.where(valid, x, NEG_INF)
    m = tl.max(x, axis)
    ms = tl.where(m == NEG_INF, 0.0, m)
    s = tl.sum(tl.exp(x - tl.expand_dims(ms, axis)), axis)
    return tl.where(m == NEG_INF, NEG_INF, ms + tl.log(s))


# ------------------------------------------------------------------------------------------------
# sorted ids of a sparse teacher: per-row cursors instead of a pass per slot
#
# A row's K slots hold its ids in ascending order with the empty slots (-1) last (the host sorts
# them). A cursor is a slot index per row; a tile of columns [c0, c1) visits only the ids inside
# it, so a tile costs one compare pass per id it holds (the most any row of the block holds),
# not K passes.


@triton.jit
def load_id(ids_ptr, stride_in, rows, rmask, cur, K):
    """The id at slot `cur` of each row; 2^31 - 1 (beyond every column) past the row's ids."""
    x = tl.load(ids_ptr + rows.to(tl.int64) * stride_in + cur, mask=rmask & (cur < K), other=-1)
    return tl.where(x >= 0, x, 2147483647)


@triton.jit
def first_id_at_least(ids_ptr, stride_in, rows, rmask, K, c, LOG_K: tl.constexpr):
    """Per row, the first slot whose id is >= c (or empty): a bisection, LOG_K >= log2(K + 1)."""
    lo = tl.zeros(rows.shape, tl.int32)
    hi = tl.zeros(rows.shape, tl.int32) + K
    for _ in tl.static_range(LOG_K):
        mid = (lo + hi) // 2
        active = lo < hi
        below = load_id(ids_ptr, stride_in, rows, rmask, mid, K) < c
        hi = tl.where(active & ~below, mid, hi)
        lo = tl.where(active & below, mid + 1, lo)
    return lo


# ------------------------------------------------------------------------------------------------
# logit tiles


@triton.jit
def linear_tile(h_ptr, stride_hn, w_ptr, stride_wv, b_ptr, rows, cols, N, V, H, cap,
                HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """softcap(h[rows] @ w[cols]^T + b[cols]) as fp32 (rows, cols); reads BLOCK_N*H + BLOCK_V*H
    elements. Out-of-range entries hold garbage-free zeros before the bias/cap (mask them)."""
    rmask = rows < N
    cmask = cols < V
    roff = rows.to(tl.int64)[:, None] * stride_hn     # int64: N x H or V x H may pass 2^31
    coff = cols.to(tl.int64)[:, None] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        kh = h0 + tl.arange(0, BLOCK_H)
        kmask = kh < H
        a = tl.load(h_ptr + roff + kh[None, :], mask=rmask[:, None] & kmask[None, :],
                    other=0.0)
        w = tl.load(w_ptr + coff + kh[None, :], mask=cmask[:, None] & kmask[None, :],
                    other=0.0)
        if IEEE:
            acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_CAP:
        acc = softcap(acc, cap)
    return acc


@triton.jit
def logits_tile(x_ptr, stride_xn, stride_xv, rows, cols, N, V):
    """x[rows, cols] as fp32 (0 outside the tensor)."""
    mask = (rows < N)[:, None] & (cols < V)[None, :]
    offs = rows.to(tl.int64)[:, None] * stride_xn + cols.to(tl.int64)[None, :] * stride_xv
    return tl.load(x_ptr + offs, mask=mask,
                   other=0.0).to(tl.float32)


# ------------------------------------------------------------------------------------------------
# element terms (docs/semantics.md table); lp, lq log-probabilities, -inf allowed, 0 log 0 = 0.
# The 0 log 0 masks test "!= 0", not "> 0": a NaN must propagate (and be reported), not vanish.


@triton.jit
def sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def element_terms(lp, lq, DIV: tl.constexpr, LOG_W, LOG_1MW):
    """(f, qh) elementwise for divergence code DIV; see the module docstring for the codes."""
    p = tl.exp(lp)
    q = tl.exp(lq)
    if DIV == 0:    # forward KL: f = p (lp - lq), qh = -p
        f = tl.where(p != 0, p * (lp - lq), 0.0)
        qh = -p
    elif DIV == 1:  # reverse KL: f = qh = q (lq - lp)
        f = tl.where(q != 0, q * (lq - lp), 0.0)
        qh = f
    elif DIV == 2:  # jsd, m = beta p + (1 - beta) q
        w = tl.exp(LOG_W)
        lm = logaddexp(lp + LOG_W, lq + LOG_1MW)
        tq = tl.where(q != 0, q * (lq - lm), 0.0)
        f = w * tl.where(p != 0, p * (lp - lm), 0.0) + (1.0 - w) * tq
        qh = (1.0 - w) * tq
    elif DIV == 3:  # skew forward KL, m = alpha p + (1 - alpha) q
        lm = logaddexp(lp + LOG_W, lq + LOG_1MW)
        f = tl.where(p != 0, p * (lp - lm), 0.0)
        qh = tl.where(p != 0, -tl.exp(LOG_1MW) * p * tl.exp(lq - lm), 0.0)
    elif DIV == 4:  # skew reverse KL, m = alpha q + (1 - alpha) p
        lm = logaddexp(lq + LOG_W, lp + LOG_1MW)
        r = lq - lm
        f = tl.where(q != 0, q * r, 0.0)
        qh = tl.where(q != 0, q * (r - tl.exp(LOG_W) * tl.exp(r)), 0.0)
    else:           # tvd
        f = 0.5 * tl.abs(p - q)
        qh = 0.5 * q * sign(q - p)
    return f, qh


@triton.jit
def akl_terms(lp, lq):
    """AKL's forward elements: (p (lp - lq), q (lq - lp), |p - q|), 0 log 0 = 0."""
    p = tl.exp(lp)
    q = tl.exp(lq)
    fkl = tl.where(p != 0, p * (lp - lq), 0.0)
    rkl = tl.where(q != 0, q * (lq - lp), 0.0)
    return fkl, rkl, tl.abs(p - q)


@triton.jit
def akl_qh(lp, lq, w_h, w_t):
    """AKL's qh = w_h qh_fkl + w_t qh_rkl = -w_h p + w_t q (lq - lp); w_h, w_t per row (rows, 1)."""
    q = tl.exp(lq)
    return w_t * tl.where(q != 0, q * (lq - lp), 0.0) - w_h * tl.exp(lp)


@triton.jit
def grad_qh(lp, lq, akl_ptr, rows, rmask, DIV: tl.constexpr, LOG_W, LOG_1MW):
    """The backward's qh for divergence code DIV; AKL (6) reads its per-row weights [w_h, w_t] from
    akl_ptr (N, 2)."""
    if DIV == 6:
        w_h = tl.load(akl_ptr + rows * 2 + 0, mask=rmask, other=0.0)
        w_t = tl.load(akl_ptr + rows * 2 + 1, mask=rmask, other=0.0)
        qh = akl_qh(lp, lq, w_h[:, None], w_t[:, None])
    else:
        _, qh = element_terms(lp, lq, DIV, LOG_W, LOG_1MW)
    return qh


@triton.jit
def head_tile(x_ptr, stride_xn, stride_xv, w_ptr, stride_wv, b_ptr, H, cap, rows, cols, N, V,
              LINEAR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, IEEE: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """One model's logit tile: from its LM head (LINEAR: x = hidden, w = weight) or from a logits
    tensor x (w, b, H unused). fp32 (rows, cols)."""
    if LINEAR:
        z = linear_tile(x_ptr, stride_xn, w_ptr, stride_wv, b_ptr, rows, cols, N, V, H, cap,
                        HAS_BIAS, HAS_CAP, IEEE, BLOCK_N, BLOCK_V, BLOCK_H)
    else:
        z = logits_tile(x_ptr, stride_xn, stride_xv, rows, cols, N, V)
        if HAS_CAP:
            z = softcap(z, cap)
    return z
