"""Host side of the triton backend's losses: the contract functions of docs/backends.md for
kd_loss, fused_linear_kd_loss and fused_linear_sparse_kd_loss.

Forward: streaming kernels only (forward KL: one pass over both heads; other divergences: a
LSE pass, then a pass summing f and qh); extra memory O(N * (splits + k)) floats (the LSE/sum partials
of the vocabulary splits and the k gathered logits).
Backward: for each chunk of the vocabulary one kernel recomputes the logit tiles (tl.dot) and
writes the logit gradient g of that chunk, (N, chunk) with chunk * N * bytes <= opts.chunk_bytes;
then dh += g W_chunk and dW_chunk = g^T h run as GEMMs (fp32 accumulation inside the GEMM, dh
accumulated in fp32 across chunks), db_chunk = sum_rows g in fp32. Every step is deterministic
(no atomics). kd_loss writes its logits gradient directly (it is the output).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton

from ...options import LOG_TAIL_FLOOR, KDOptions, DIVERGENCES, TAILS
from .config import Tiles, chunk_columns, linear_tiles, logits_tiles, vocab_splits
from .dense_kernels import _dense_fkl_kernel, _dense_grad_kernel, _dense_terms_kernel, _lse_kernel
from .sparse_kernels import _sparse_grad_kernel, _sparse_rows_kernel


class Head(NamedTuple):
    """One model's logits source as kernel arguments: an LM head (x = hidden (N, H), w (V, H),
    b) or a logits tensor (x = logits (N, V); w, b are placeholders)."""
    x: torch.Tensor
    sxn: int
    sxv: int
    w: torch.Tensor
    swv: int
    b: torch.Tensor
    H: int
    cap: float
    linear: bool
    has_bias: bool
    has_cap: bool

    def args(self):
        return (self.x, self.sxn, self.sxv, self.w, self.swv, self.b, self.H, self.cap)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the last dimension with stride 1; copy (never modify) otherwise."""
    return t if t.stride(-1) == 1 else t.contiguous()


def linear_head(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], cap: Optional[float]) -> Head:
    h, w = _row_major(h), _row_major(w)
    b = b.contiguous() if b is not None else None
    return Head(h, h.stride(0), 1, w, w.stride(0), b if b is not None else w, h.shape[1],
                float(cap or 1.0), True, b is not None, cap is not None)


def logits_head(z: torch.Tensor) -> Head:
    return Head(z, z.stride(0), z.stride(1), z, 0, z, 1, 1.0, False, False, False)


def _tiles(head: Head) -> Tiles:
    return linear_tiles(head.x.device) if head.linear else logits_tiles(head.x.device)


def _ieee(head: Head) -> bool:
    """fp32 inputs get full-precision tl.dot (not TF32), as torch's fp32 matmul does by default."""
    return head.linear and head.x.dtype == torch.float32


def _mix_logs(opts: KDOptions) -> tuple[float, float]:
    w = opts.beta if opts.divergence == "jsd" else opts.alpha
    return math.log(w), math.log1p(-w)


def _div_code(opts: KDOptions) -> int:
    return DIVERGENCES.index(opts.divergence)


# ------------------------------------------------------------------------------------------------
# streaming LSE of one head


def head_lse(head: Head, n: int, v: int, T: float, labels: Optional[torch.Tensor], two: bool,
             ids: Optional[torch.Tensor] = None):
    """(LSE(z/T), LSE(z) if two else None, z[label] if labels is given else None,
    LSE(z/T) outside each row's ids if ids is given else None), fp32 (N,), and z at the ids
    (N, next_pow2(k)) (None without ids). ids: sorted per row by _sorted_slots."""
    dev = head.x.device
    tiles = _tiles(head)
    per, splits = vocab_splits(dev, n, v, tiles)
    part = torch.empty(4, n, splits, dtype=torch.float32, device=dev)
    lab = labels if labels is not None else part
    k = ids.shape[1] if ids is not None else 0
    kp = triton.next_power_of_2(max(k, 1))
    # z at the ids: each slot is written by the one program whose tile holds its id; empty slots
    # (and ids no tile holds) keep 0
    zk = torch.zeros((n, kp) if ids is not None else (1,), dtype=torch.float32, device=dev)
    grid = (triton.cdiv(n, tiles.block_n), splits)
    _lse_kernel[grid](*head.args(), lab, part[0], part[1], part[2], ids if ids is not None else part,
                      ids.stride(0) if ids is not None else 0, k, part[3], zk, n, v, 1.0 / T, per, splits,
                      LINEAR=head.linear, HAS_BIAS=head.has_bias, HAS_CAP=head.has_cap,
                      IEEE=_ieee(head), TWO=two, HAS_LABEL=labels is not None, HAS_IDS=ids is not None,
                      KP=kp, LOG_K=max(k, 1).bit_length(), **tiles.launch())
    lse_t = torch.logsumexp(part[0], 1)
    lse_1 = torch.logsumexp(part[1], 1) if two else None
    pick = part[2].sum(1) if labels is not None else None
    if ids is None:
        return lse_t, lse_1, pick, None, None
    return lse_t, lse_1, pick, torch.logsumexp(part[3], 1), zk


def _student_lses(head: Head, n: int, v: int, labels: torch.Tensor, opts: KDOptions,
                  ids: Optional[torch.Tensor] = None):
    """LSE(b), LSE(z_s) (0 without CE, as in the torch backend), the CE term per row (None without
    CE), LSE(b) outside the ids and z at the ids (N, next_pow2(k)) (None, None without ids)."""
    has_ce = opts.ce_weight != 0
    T = opts.temperature
    lse_b, lse_1, pick, lse_o, zk = head_lse(head, n, v, T, labels if has_ce else None,
                                             two=has_ce and T != 1.0, ids=ids)
    if not has_ce:
        return lse_b, torch.zeros_like(lse_b), None, lse_o, zk
    if lse_1 is None:
        lse_1 = lse_b
    ce = torch.where(labels >= 0, lse_1 - pick, 0.0)
    return lse_b, lse_1, ce, lse_o, zk


# ------------------------------------------------------------------------------------------------
# dense teacher


def _dense_forward_kl(s: Head, t: Head, n: int, v: int, labels: torch.Tensor, opts: KDOptions):
    """Forward KL: one pass over both heads (_dense_fkl_kernel), splits merged here."""
    dev = s.x.device
    T = opts.temperature
    has_ce = opts.ce_weight != 0
    two = has_ce and T != 1.0
    tiles = _tiles(s)
    per, splits = vocab_splits(dev, n, v, tiles)
    part = torch.empty(7, n, splits, dtype=torch.float32, device=dev)
    grid = (triton.cdiv(n, tiles.block_n), splits)
    _dense_fkl_kernel[grid](*s.args(), *t.args(), labels, part, n, v, 1.0 / T, per, splits,
                            LINEAR=s.linear, S_BIAS=s.has_bias, S_CAP=s.has_cap, T_BIAS=t.has_bias,
                            T_CAP=t.has_cap, IEEE=_ieee(s), TWO=two, HAS_LABEL=has_ce, **tiles.launch())
    mb, sb, ma, sa, w = part[:5]
    big_b, big_a = mb.max(1).values, ma.max(1).values
    big_b = torch.where(big_b == -math.inf, 0.0, big_b)
    big_a = torch.where(big_a == -math.inf, 0.0, big_a)
    sc_a = torch.exp(ma - big_a[:, None])
    s_b = (sb * torch.exp(mb - big_b[:, None])).sum(1)
    s_a = (sa * sc_a).sum(1)
    shift = torch.where(sa > 0, (ma - big_a[:, None]) - (mb - big_b[:, None]), 0.0)
    w = (sc_a * (w + shift * sa)).sum(1)
    lse_b, lse_a = big_b + torch.log(s_b), big_a + torch.log(s_a)
    loss = opts.kd_scale * (w / s_a - torch.log(s_a) + torch.log(s_b))
    lse_1 = torch.zeros_like(lse_b)
    if has_ce:
        lse_1 = torch.logsumexp(part[5], 1) if two else lse_b
        loss = loss + opts.ce_weight * torch.where(labels >= 0, lse_1 - part[6].sum(1), 0.0)
    S = torch.full_like(lse_b, -1.0)      # S = sum_j qh_j = -sum_j p_j = -1
    return loss, torch.stack([lse_b, lse_1, lse_a, S], 1)


AKL = DIVERGENCES.index("akl")


def _dense_forward_akl(s: Head, t: Head, n: int, v: int, labels: torch.Tensor, opts: KDOptions):
    """AKL (docs/backends.md): the LSE passes, then one terms pass streaming KL(p||q), KL(q||p) and
    sum |p - q|. loss = the CE part; stats = [LSE(b), LSE(z_s), LSE(a), S_fkl = -1] (private, the
    layout of every dense divergence) + [lse_p, lse_q, fkl, rkl, tv] (public)."""
    dev = s.x.device
    T = opts.temperature
    lse_b, lse_1, ce, _, _ = _student_lses(s, n, v, labels, opts)
    lse_a = head_lse(t, n, v, T, None, two=False)[0]
    tiles = _tiles(s)
    per, splits = vocab_splits(dev, n, v, tiles)
    part = torch.empty(3, n, splits, dtype=torch.float32, device=dev)
    grid = (triton.cdiv(n, tiles.block_n), splits)
    _dense_terms_kernel[grid](*s.args(), *t.args(), lse_b, lse_a, part[0], part[1], part[2], n, v,
                              1.0 / T, 0.0, 0.0, per, splits, DIV=AKL, LINEAR=s.linear,
                              S_BIAS=s.has_bias, S_CAP=s.has_cap, T_BIAS=t.has_bias,
                              T_CAP=t.has_cap, IEEE=_ieee(s), **tiles.launch())
    fkl, rkl, tv = part.sum(2)
    loss = opts.ce_weight * ce if ce is not None else torch.zeros_like(lse_b)
    S = torch.full_like(lse_b, -1.0)      # forward KL: S = -sum_j p_j = -1
    return loss, torch.stack([lse_b, lse_1, lse_a, S, lse_a, lse_b, fkl, rkl, tv], 1)


def _akl_weights(akl_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w (N, 2) fp32 contiguous, w_h, w_t)."""
    w = akl_weights.to(torch.float32).contiguous()
    return w, w[:, 0], w[:, 1]


def _dense_akl_stats(stats: torch.Tensor, akl_weights: torch.Tensor):
    """The grad kernel's (N, 4) stats with S = w_h S_fkl + w_t S_rkl (S_rkl = KL(q||p)) and the
    weights. O(N), no host sync."""
    w, w_h, w_t = _akl_weights(akl_weights)
    S = w_h * stats[:, 3] + w_t * stats[:, 7]
    return torch.stack([stats[:, 0], stats[:, 1], stats[:, 2], S], 1), w


def _dense_forward(s: Head, t: Head, n: int, v: int, labels: torch.Tensor, opts: KDOptions):
    if opts.divergence == "akl":
        return _dense_forward_akl(s, t, n, v, labels, opts)
    if opts.divergence == "forward_kl" and opts.kd_weight:
        return _dense_forward_kl(s, t, n, v, labels, opts)
    T = opts.temperature
    lse_b, lse_1, ce, _, _ = _student_lses(s, n, v, labels, opts)
    lse_a = head_lse(t, n, v, T, None, two=False)[0]
    loss = torch.zeros_like(lse_b)
    S = torch.zeros_like(lse_b)
    if opts.kd_weight:
        dev = s.x.device
        tiles = _tiles(s)
        per, splits = vocab_splits(dev, n, v, tiles)
        part = torch.empty(2, n, splits, dtype=torch.float32, device=dev)
        lw, l1mw = _mix_logs(opts)
        grid = (triton.cdiv(n, tiles.block_n), splits)
        _dense_terms_kernel[grid](*s.args(), *t.args(), lse_b, lse_a, part[0], part[1], part[1], n, v, 1.0 / T,
                                  lw, l1mw, per, splits, DIV=_div_code(opts), LINEAR=s.linear,
                                  S_BIAS=s.has_bias, S_CAP=s.has_cap, T_BIAS=t.has_bias,
                                  T_CAP=t.has_cap, IEEE=_ieee(s), **tiles.launch())
        loss = opts.kd_scale * part[0].sum(1)
        S = part[1].sum(1)
    if ce is not None:
        loss = loss + opts.ce_weight * ce
    return loss, torch.stack([lse_b, lse_1, lse_a, S], 1)


def _dense_grad_launch(s: Head, t: Head, n: int, v: int, labels, stats, grad_rows, opts: KDOptions,
                       out: torch.Tensor, c_start: int, c_end: int, akl=None) -> None:
    """stats (N, 4) = [LSE(b), LSE(z_s), LSE(a), S]; akl: (N, 2) weights for divergence 'akl'."""
    tiles = _tiles(s)
    lw, l1mw = _mix_logs(opts)
    grid = (triton.cdiv(n, tiles.block_n), triton.cdiv(c_end - c_start, tiles.block_v))
    _dense_grad_kernel[grid](*s.args(), *t.args(), labels, stats, akl if akl is not None else stats,
                             grad_rows, out, out.stride(0),
                             out.stride(1), n, v, c_start, c_end, 1.0 / opts.temperature,
                             opts.kd_scale / opts.temperature, float(opts.ce_weight), lw, l1mw,
                             DIV=_div_code(opts), HAS_KD=bool(opts.kd_weight),
                             HAS_CE=opts.ce_weight != 0, LINEAR=s.linear, S_BIAS=s.has_bias,
                             S_CAP=s.has_cap, T_BIAS=t.has_bias, T_CAP=t.has_cap, IEEE=_ieee(s),
                             **tiles.launch())


def kd_forward(zs, zt, labels, opts: KDOptions):
    n, v = zs.shape
    return _dense_forward(logits_head(zs), logits_head(zt), n, v, labels, opts)


def _dense_grad_inputs(stats, akl_weights, opts: KDOptions):
    """(stats (N, 4), akl weights or None) for the dense grad kernel."""
    if opts.divergence == "akl":
        return _dense_akl_stats(stats, akl_weights)
    return stats.contiguous(), None


def kd_backward(zs, zt, labels, stats, grad_rows, opts: KDOptions, akl_weights=None):
    n, v = zs.shape
    grad = torch.empty((n, v), dtype=zs.dtype, device=zs.device)
    stats, akl = _dense_grad_inputs(stats, akl_weights, opts)
    _dense_grad_launch(logits_head(zs), logits_head(zt), n, v, labels, stats,
                       grad_rows.contiguous(), opts, grad, 0, v, akl)
    return grad


def linear_kd_forward(hs, ws, bs, ht, wt, bt, labels, opts: KDOptions):
    s = linear_head(hs, ws, bs, opts.student_softcap)
    t = linear_head(ht, wt, bt, opts.teacher_softcap)
    return _dense_forward(s, t, hs.shape[0], ws.shape[0], labels, opts)


def head_backward(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], need, opts: KDOptions,
                  write_chunk, grad_rows: torch.Tensor, dh_fp32: bool = False) -> tuple:
    """Drive the chunked backward: write_chunk(g, c_start, c_end) fills g (N, c_end - c_start) with
    d(total)/d(pre-softcap logits); this turns it into (dh, dW, db) in the inputs' dtypes (dh as
    its fp32 accumulator with dh_fp32: a vocabulary shard's partial, summed over shards later)."""
    need_dh, need_dw, need_db = need
    n, v = h.shape[0], w.shape[0]
    if not (need_dh or need_dw or need_db):
        return None, None, None
    if need_dw:   # rows with grad_row == 0 add exactly 0 to dW even if their hidden state is NaN
        h = torch.where((grad_rows != 0).unsqueeze(1), h, torch.zeros((), dtype=h.dtype, device=h.device))
    # fp32 g when db is needed (summed in fp32) or the inputs are fp32; else g in the GEMM dtype.
    g_dtype = torch.float32 if (need_db or h.dtype == torch.float32) else h.dtype
    g_bytes = torch.finfo(g_dtype).bits // 8 + (h.element_size() if g_dtype != h.dtype else 0)
    cols = chunk_columns(n, v, g_bytes, opts.chunk_bytes, linear_tiles(h.device))
    gbuf = torch.empty((n, cols), dtype=g_dtype, device=h.device)
    dh32 = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_dh else None
    dw = torch.empty(w.shape, dtype=w.dtype, device=w.device) if need_dw else None
    db = torch.empty(v, dtype=b.dtype, device=w.device) if need_db else None
    for c0 in range(0, v, cols):
        c1 = min(v, c0 + cols)
        g = gbuf[:, : c1 - c0]
        write_chunk(g, c0, c1)
        gd = g if g.dtype == h.dtype else g.to(h.dtype)
        if need_dh:
            if h.dtype == torch.float32:
                dh32.addmm_(gd, w[c0:c1])
            else:
                dh32 += (gd @ w[c0:c1]).float()
        if need_dw:
            torch.mm(gd.T, h, out=dw[c0:c1])      # rows of our contiguous dw: contiguous
        if need_db:
            db[c0:c1] = g.sum(0).to(db.dtype)
    dh = (dh32 if dh_fp32 else dh32.to(h.dtype)) if need_dh else None
    return dh, dw, db


def linear_kd_backward(hs, ws, bs, ht, wt, bt, labels, stats, grad_rows, opts: KDOptions, need,
                       akl_weights=None):
    s = linear_head(hs, ws, bs, opts.student_softcap)
    t = linear_head(ht, wt, bt, opts.teacher_softcap)
    n, v = hs.shape[0], ws.shape[0]
    stats, akl = _dense_grad_inputs(stats, akl_weights, opts)
    grad_rows = grad_rows.contiguous()

    def write_chunk(g, c0, c1):
        _dense_grad_launch(s, t, n, v, labels, stats, grad_rows, opts, g, c0, c1, akl)

    return head_backward(s.x, s.w, bs, need, opts, write_chunk, grad_rows)


# ------------------------------------------------------------------------------------------------
# sparse (cached) teacher


def _sparse_rows(zk, ids, vals, lse_b, lse_out, stats, v, opts: KDOptions, coef: bool):
    n, k = ids.shape
    dev = ids.device
    kp = triton.next_power_of_2(k)
    block_n = max(1, min(64, 2048 // kp))
    lw, l1mw = _mix_logs(opts)
    dummy = lse_b
    width = 8 if opts.divergence == "akl" else 4
    out = torch.empty((n, width), dtype=torch.float32, device=dev) if not coef else dummy
    c = torch.empty((n, k), dtype=torch.float32, device=dev) if coef else dummy
    dense = torch.empty(n, dtype=torch.float32, device=dev) if coef else dummy
    _sparse_rows_kernel[(triton.cdiv(n, block_n),)](
        zk if zk is not None else dummy, ids, ids.stride(0), vals, vals.stride(0), lse_b,
        lse_out if lse_out is not None else dummy, stats if stats is not None else dummy, out, c, dense,
        n, k, v,
        1.0 / opts.temperature, opts.kd_scale / opts.temperature, lw, l1mw, LOG_TAIL_FLOOR,
        DIV=_div_code(opts), TAIL=TAILS.index(opts.tail), WEIGHTS=opts.values == "weights",
        P_TAIL=opts.tail == "bucket" and opts.values != "weights", COEF=coef, BLOCK_N=block_n, KP=kp)
    return (c, dense) if coef else out


def _sorted_ids(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(each row's ids ascending with the empty slots (-1) last, int64; the slot order: sorted[:, j]
    = ids[:, order[:, j]]). The streaming kernels walk a row's sorted ids with a cursor; the per-row
    kernel keeps the caller's slot order, so its sums round as they always did. O(N k log k)."""
    key = torch.where(ids >= 0, ids, torch.iinfo(ids.dtype).max)
    order = key.argsort(1)
    return ids.gather(1, order).to(torch.int64), order


def linear_sparse_kd_forward(hs, ws, bs, ids, vals, labels, opts: KDOptions):
    s = linear_head(hs, ws, bs, opts.student_softcap)
    n, v = hs.shape[0], ws.shape[0]
    ids, vals = _row_major(ids), _row_major(vals)
    need_ids = bool(opts.kd_weight) or opts.divergence == "akl"
    ids_s, order = _sorted_ids(ids) if need_ids else (None, None)
    lse_b, lse_1, ce, lse_o, zk = _student_lses(s, n, v, labels, opts, ids_s)
    if zk is not None:    # z at the sorted ids back to the caller's slot order
        k = ids.shape[1]
        zk = torch.zeros_like(zk).scatter_(1, order, zk[:, :k])
    loss = torch.zeros_like(lse_b)
    stats = torch.zeros((n, 4), dtype=torch.float32, device=hs.device)
    if opts.divergence == "akl":
        return _sparse_forward_akl(zk, ids, vals, lse_b, lse_1, ce, lse_o, v, opts)
    if opts.kd_weight:
        rows = _sparse_rows(zk, ids, vals, lse_b, lse_o, None, v, opts, coef=False)
        loss = opts.kd_scale * rows[:, 1]
        stats[:, 0], stats[:, 2], stats[:, 3] = rows[:, 0], rows[:, 3], rows[:, 2]
    stats[:, 1] = lse_1
    if ce is not None:
        loss = loss + opts.ce_weight * ce
    return loss, stats


def _sparse_forward_akl(zk, ids, vals, lse_b, lse_1, ce, lse_o, v, opts: KDOptions):
    """AKL, sparse teacher: the k + 1 outcomes of the tail mode in one per-row pass.
    loss = the CE part; stats = [LSE(b) (over K for renorm_both), LSE(z_s), h_Q of forward KL,
    h_Q of reverse KL, S_fkl] (private) + [lse_p, lse_q, fkl, rkl, tv] (public); S_rkl = rkl."""
    r = _sparse_rows(zk, ids, vals, lse_b, lse_o, None, v, opts, coef=False)
    loss = opts.ce_weight * ce if ce is not None else torch.zeros_like(lse_b)
    stats = torch.stack([r[:, 0], lse_1, r[:, 5], r[:, 6], r[:, 4],
                         r[:, 7], r[:, 0], r[:, 1], r[:, 2], r[:, 3]], 1)
    return loss, stats


def _sparse_akl_stats(stats: torch.Tensor, akl_weights: torch.Tensor):
    """The (N, 4) [LSE, LSE(z_s), h_Q, S] of the other divergences, mixed with the row weights:
    h_Q = w_h h_Q,fkl + w_t h_Q,rkl, S = w_h S_fkl + w_t rkl; and the weights (N, 2)."""
    w, w_h, w_t = _akl_weights(akl_weights)
    hQ = w_h * stats[:, 2] + w_t * stats[:, 3]
    S = w_h * stats[:, 4] + w_t * stats[:, 8]
    return torch.stack([stats[:, 0], stats[:, 1], hQ, S], 1), w


def linear_sparse_kd_backward(hs, ws, bs, ids, vals, labels, stats, grad_rows, opts: KDOptions, need,
                              akl_weights=None):
    s = linear_head(hs, ws, bs, opts.student_softcap)
    n, v = hs.shape[0], ws.shape[0]
    ids, vals = _row_major(ids), _row_major(vals)
    akl = None
    if opts.divergence == "akl":
        stats, akl = _sparse_akl_stats(stats, akl_weights)
    stats, grad_rows = stats.contiguous(), grad_rows.contiguous()
    has_kd = bool(opts.kd_weight)
    if has_kd:
        lpk, dense = _sparse_rows(None, ids, vals, stats[:, 0].contiguous(), None, stats, v, opts,
                                  coef=True)
    else:
        lpk = dense = stats
    ids_s, order = _sorted_ids(ids)
    if has_kd:            # the teacher's log-probs in the sorted slot order of the grad kernel
        lpk = lpk.gather(1, order)
    write_chunk = sparse_grad_writer(s, n, v, ids_s, lpk, dense, labels, stats, akl, grad_rows, opts)
    return head_backward(s.x, s.w, bs, need, opts, write_chunk, grad_rows)


def sparse_grad_writer(s: Head, n: int, v: int, ids_s, lpk, dense, labels, stats, akl, grad_rows,
                       opts: KDOptions):
    """write_chunk for head_backward: _sparse_grad_kernel over columns [c0, c1). ids_s sorted per
    row (_sorted_ids), lpk (N, k) the teacher's log-probs in that slot order, dense (N,) the
    coefficient of the tokens outside K; stats (N, 4) [LSE, LSE(z), h_Q, S]; lpk and dense are
    placeholders without a KD term."""
    k = ids_s.shape[1]
    has_kd = bool(opts.kd_weight)
    tiles = linear_tiles(s.x.device)
    lw, l1mw = _mix_logs(opts)

    def write_chunk(g, c0, c1):
        grid = (triton.cdiv(n, tiles.block_n), triton.cdiv(c1 - c0, tiles.block_v))
        _sparse_grad_kernel[grid](s.x, s.sxn, s.w, s.swv, s.b, s.H, s.cap, ids_s, ids_s.stride(0), lpk,
                                  dense, labels, stats, akl if akl is not None else stats, grad_rows,
                                  g, g.stride(0), n, v, k, c0, c1,
                                  1.0 / opts.temperature, opts.kd_scale / opts.temperature,
                                  float(opts.ce_weight), lw, l1mw, DIV=_div_code(opts), HAS_KD=has_kd,
                                  HAS_DENSE=opts.tail != "renorm_both", HAS_CE=opts.ce_weight != 0,
                                  HAS_BIAS=s.has_bias, HAS_CAP=s.has_cap, IEEE=_ieee(s),
                                  LOG_K=max(k, 1).bit_length(), **tiles.launch())

    return write_chunk
