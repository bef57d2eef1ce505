"""Adaptive KL's per-row weights, once for every backend (docs/semantics.md, "Adaptive KL").

A backend's forward for divergence="akl" returns, in the last five stats columns,
[lse_p, lse_q, fkl, rkl, tv] (docs/backends.md). Here, per row:

    H      = the teacher's top tokens in descending p up to the first where the cumulative p >= mu
             (at most akl_head_max; from a top-M of the teacher, or the cached slots of a sparse one)
    g_head = sum_H |p - q|,  g_tail = max(tv - g_head, 0)
    w_h    = g_head / (g_head + g_tail) (1/2 when both are 0),  w_t = 1 - w_h
    loss   = ce part + kd_scale * (w_h * fkl + w_t * rkl)

p and q at H come from gathered logits: p_j = exp(a_j - lse_p), q_j = exp(b_j - lse_q). The student's
logits at H are one dot product per (row, head token) (no GEMM over the vocabulary), in row chunks
within opts.chunk_bytes. The weights are constants for the gradient; the backward hands them to the
backend as `akl_weights`. Nothing here is O(N x V).
"""
from __future__ import annotations

from typing import Optional

import torch

from .options import KDOptions

PUBLIC = 5          # trailing stats columns of a backend's akl forward
MU_TOL = 1e-6       # the head's mass counts as reaching mu within this
_NEG_INF = float("-inf")


def head_mask(lp_desc: torch.Tensor, valid: torch.Tensor, mu: float) -> torch.Tensor:
    """H among candidates sorted by descending teacher log-prob: a candidate is in H while the
    teacher mass of the candidates before it is below mu (so H ends with the first to reach mu).
    "Below" means by more than MU_TOL: sampled caches hold multiples of 1/draws, whose running sums
    hit mu exactly and would otherwise fall on either side of it by rounding (docs/semantics.md)."""
    p = torch.where(valid, lp_desc.exp(), 0.0)
    before = p.double().cumsum(1) - p.double()
    return valid & (before < mu - MU_TOL)


def _row_chunks(n: int, per_row_bytes: int, budget: int):
    step = max(1, min(n, budget // max(1, per_row_bytes)))
    for r in range(0, n, step):
        yield slice(r, min(n, r + step))


def gathered_logits(h: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], cap: Optional[float],
                    ids: torch.Tensor, mask: torch.Tensor, budget: int) -> torch.Tensor:
    """z[r, j] = softcap(h_r . w_{ids[r, j]} + b) where mask[r, j], else 0; fp32 (rows, M)
    (ids are read only where mask is set).
    The products are exact in fp32 (from fp32/fp16/bf16 operands), summed in fp32 as the GEMMs do."""
    z = torch.zeros(ids.shape, dtype=torch.float32 if h.dtype != torch.float64 else h.dtype,
                    device=h.device)
    per_row = ids.shape[1] * h.shape[1] * 4 * 2
    for s in _row_chunks(ids.shape[0], per_row, budget):
        m = mask[s]
        rows, cols = m.nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        tok = ids[s][rows, cols]
        hr = h[s][rows].to(z.dtype)
        zr = (hr * w[tok].to(z.dtype)).sum(1)
        if b is not None:
            zr = zr + b[tok].to(z.dtype)
        if cap is not None:
            zr = cap * torch.tanh(zr / cap)
        zs = z[s]
        zs[rows, cols] = zr
    return z


def weights(lp_h: torch.Tensor, lq_h: torch.Tensor, mask: torch.Tensor, tv: torch.Tensor) -> torch.Tensor:
    """(rows, 2) [w_h, w_t] from p and q (as logs) at the head candidates and the row's total tv."""
    diff = torch.where(mask, (lp_h.exp() - lq_h.exp()).abs(), 0.0)
    g_head = diff.sum(1)
    g_tail = (tv - g_head).clamp_min(0.0)
    total = g_head + g_tail
    w_h = torch.where(total > 0, g_head / torch.where(total > 0, total, 1.0), 0.5)
    return torch.stack([w_h, 1.0 - w_h], 1)


def _finish(loss_ce: torch.Tensor, stats: torch.Tensor, lp_h, z_h, mask, opts: KDOptions,
            row_mask: torch.Tensor):
    lse_q, fkl, rkl, tv = (stats[:, -4 + i] for i in range(4))
    lq_h = z_h / opts.temperature - lse_q.unsqueeze(1)
    w = weights(lp_h, lq_h, mask, tv)
    w = torch.where(row_mask.unsqueeze(1), w, 0.0)     # ignored rows: no weight, whatever they hold
    loss = loss_ce + opts.kd_scale * (w[:, 0] * fkl + w[:, 1] * rkl)
    return loss, w.to(torch.float32) if w.dtype != torch.float64 else w


def finish_logits(loss_ce, stats, zs: torch.Tensor, zt: torch.Tensor, opts: KDOptions, row_mask):
    """kd_loss: H from a top-M of the teacher's logits (ties by the smaller id)."""
    from .backends.torch.topk import topk_smallest_id_ties
    n, v = zt.shape
    m = min(opts.akl_head_max, v)
    lse_p = stats[:, -5]
    lp_h = torch.empty(n, m, dtype=stats.dtype, device=zt.device)
    ids = torch.empty(n, m, dtype=torch.int64, device=zt.device)
    for s in _row_chunks(n, v * 4 * 3, opts.chunk_bytes):
        x = zt[s].to(stats.dtype)
        x = torch.where(torch.isnan(x), _NEG_INF, x)   # ignored rows may hold anything
        vals, idx = topk_smallest_id_ties(x, m)
        lp_h[s], ids[s] = vals / opts.temperature - lse_p[s].unsqueeze(1), idx
    mask = head_mask(lp_h, torch.ones_like(ids, dtype=torch.bool), opts.mu)
    z_h = torch.where(mask, zs.gather(1, ids).to(stats.dtype), 0.0)
    return _finish(loss_ce, stats, lp_h, z_h, mask, opts, row_mask)


def finish_linear(loss_ce, stats, backend, hs, ws, bs, ht, wt, bt, opts: KDOptions, row_mask):
    """fused_linear_kd_loss: H from the backend's linear_topk on the teacher head."""
    import dataclasses
    m = min(opts.akl_head_max, ws.shape[0])
    t_opts = dataclasses.replace(opts, divergence="forward_kl", student_softcap=opts.teacher_softcap)
    if m > getattr(backend, "MAX_TOPK", m):
        raise ValueError(f"akl_head_max={opts.akl_head_max} exceeds what backend "
                         f"{backend.NAME!r}'s linear_topk supports ({backend.MAX_TOPK}) for the "
                         f"teacher's head set")
    ht = torch.where(row_mask.unsqueeze(1), ht, 0.0)   # ignored rows may hold anything
    lp_h, ids, _ = backend.linear_topk(ht, wt, bt, m, t_opts)
    lp_h = lp_h.to(stats.dtype)
    mask = head_mask(lp_h, torch.ones_like(ids, dtype=torch.bool), opts.mu)
    z_h = gathered_logits(hs, ws, bs, opts.student_softcap, ids, mask, opts.chunk_bytes)
    return _finish(loss_ce, stats, lp_h, z_h.to(stats.dtype), mask, opts, row_mask)


def finish_sparse(loss_ce, stats, hs, ws, bs, ids, vals, opts: KDOptions, row_mask):
    """fused_linear_sparse_kd_loss: H among the cached slots, p as the tail mode defines it on K."""
    from .backends.torch.topk import sort_by_value_then_id
    valid = ids >= 0
    u = vals.to(stats.dtype)
    if opts.values == "weights":
        u = torch.log(u)
    lp = (u - stats[:, -5].unsqueeze(1)).masked_fill(~valid, _NEG_INF)
    # descending p, ties by the smaller id; empty slots (-1) sort as the largest id
    lp, ids_s = sort_by_value_then_id(lp, torch.where(valid, ids, torch.iinfo(torch.int64).max))
    mask = head_mask(lp, ids_s != torch.iinfo(torch.int64).max, opts.mu)
    mask[:, opts.akl_head_max:] = False
    z_h = gathered_logits(hs, ws, bs, opts.student_softcap, ids_s, mask, opts.chunk_bytes)
    return _finish(loss_ce, stats, lp, z_h.to(stats.dtype), mask, opts, row_mask)
