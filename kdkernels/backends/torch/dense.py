"""Dense teacher, torch reference: `kd_loss` (logits given) and `fused_linear_kd_loss` (LM heads given).

Per row (docs/semantics.md):
    loss = kd_scale * sum_j f(p_j, q_j) + ce_weight * (LSE(z_s) - z_s[y])
    dloss/dz_s_j = [kd_scale / T * (qh_j - q_j S) + ce_weight * (softmax(z_s)_j - [j = y])] * dz/dx
Rows are processed in blocks whose fp32 temporaries fit opts.chunk_bytes, so nothing of size N x V is
ever held. Two paths (docs/backends.md):
  - forward / backward: the forward saves O(1) stats per row, the backward recomputes each block's
    logits (head GEMMs: 2 forward + 1 recompute, then dH and dW);
  - fused (scalar losses): per block the logits, then the loss and the logit gradient from the same
    logits, then dH and dW: no recompute.
Each LSE is kept as two fp32 numbers hi + lo (common.lse_pair). Saved per row: stats = [LSE(b), LSE(z_s),
LSE(a), S, lo(b), lo(z_s), lo(a)] (fp32, N x 7, LSE = hi + lo, the first three columns the hi parts).
divergence="akl" (docs/backends.md): the loss holds the CE part only and stats are N x 12,
[LSE(b), LSE(z_s), LSE(a), S of forward KL, lo(b), lo(z_s), lo(a), lse_p, lse_q, fkl, rkl, tv]; the
backward takes the per-row weights [w_h, w_t] and uses qh = w_h qh_fkl + w_t qh_rkl,
S = w_h S_fkl + w_t rkl.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...options import KDOptions
from .common import (acc, acc_dtype, add_ce_grad, ce_rows, finish_grad, log_softmax_pair, lse_pair,
                     row_block, softcap)
from .terms import akl_terms, element_terms

_TEMPS = 12  # fp32 (rows, V) temporaries alive at once in the block math below


def _block_forward(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, opts: KDOptions):
    """(loss, stats) of one block of fp32 logits (stats layout: module docstring)."""
    T = opts.temperature
    b, a = zs / T, zt / T
    hb, lb = lse_pair(b)
    ha, la = lse_pair(a)
    h1, l1 = lse_pair(zs) if opts.ce_weight else (torch.zeros_like(hb), torch.zeros_like(hb))
    lse_b, lse_a = hb + lb, ha + la
    loss = torch.zeros_like(hb)
    S = torch.zeros_like(hb)
    lo = [lb, l1, la]
    if opts.divergence == "akl":
        lp = log_softmax_pair(a, ha, la)
        fkl, rkl, tv = (t.sum(1) for t in akl_terms(lp, log_softmax_pair(b, hb, lb)))
        if opts.ce_weight:
            loss = opts.ce_weight * ce_rows(zs, (h1, l1), labels)
        s_fkl = -lp.exp().sum(1)
        return loss, torch.stack([hb, h1, ha, s_fkl, *lo, lse_a, lse_b, fkl, rkl, tv], 1)
    if opts.kd_weight:
        f, qh = element_terms(log_softmax_pair(a, ha, la), log_softmax_pair(b, hb, lb), opts)
        loss = opts.kd_scale * f.sum(1)
        S = qh.sum(1)
    if opts.ce_weight:
        loss = loss + opts.ce_weight * ce_rows(zs, (h1, l1), labels)
    return loss, torch.stack([hb, h1, ha, S, *lo], 1)


def _block_grad(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor,
                grad_rows: torch.Tensor, cap: Optional[float], opts: KDOptions,
                akl_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """d(loss)/d(pre-softcap student logits) for one block, fp32."""
    T = opts.temperature
    g = torch.zeros_like(zs)
    if opts.kd_weight:
        lq = log_softmax_pair(zs / T, stats[:, 0], stats[:, 4])
        lp = log_softmax_pair(zt / T, stats[:, 2], stats[:, 6])
        _, qh = element_terms(lp, lq, opts, akl_weights)
        S = stats[:, 3:4]
        if opts.divergence == "akl":    # S = w_h S_fkl + w_t rkl
            S = (akl_weights * stats[:, [3, -2]]).sum(1, keepdim=True)
        g = (qh - lq.exp() * S) * (opts.kd_scale / T)
    if opts.ce_weight:
        g = add_ce_grad(g, zs, (stats[:, 1], stats[:, 5]), labels, opts.ce_weight)
    return finish_grad(g, zs, cap, grad_rows)


def _stats_width(opts: KDOptions) -> int:
    return 12 if opts.divergence == "akl" else 7


def _weights(akl_weights: Optional[torch.Tensor], s: slice) -> Optional[torch.Tensor]:
    return None if akl_weights is None else akl_weights[s]


def kd_forward(student_logits, teacher_logits, labels, opts: KDOptions):
    n, v = student_logits.shape
    loss = student_logits.new_empty(n, dtype=acc_dtype(student_logits))
    stats = student_logits.new_empty(n, _stats_width(opts), dtype=acc_dtype(student_logits))
    step = row_block(n, v, opts.chunk_bytes, _TEMPS)
    for r in range(0, n, step):
        s = slice(r, r + step)
        loss[s], stats[s] = _block_forward(acc(student_logits[s]), acc(teacher_logits[s]),
                                           labels[s], opts)
    return loss, stats


def kd_backward(student_logits, teacher_logits, labels, stats, grad_rows, opts: KDOptions,
                akl_weights: Optional[torch.Tensor] = None):
    n, v = student_logits.shape
    grad = torch.empty_like(student_logits, memory_format=torch.contiguous_format)
    step = row_block(n, v, opts.chunk_bytes, _TEMPS)
    for r in range(0, n, step):
        s = slice(r, r + step)
        grad[s] = _block_grad(acc(student_logits[s]), acc(teacher_logits[s]), labels[s],
                              stats[s], grad_rows[s], None, opts, _weights(akl_weights, s))
    return grad


def linear_logits(h: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
                  cap: Optional[float]) -> torch.Tensor:
    """softcap(h @ w.T + bias) as fp32 (the GEMM runs in the inputs' dtype, as naive PyTorch does)."""
    z = h @ w.T
    if bias is not None:
        z = z + bias
    return softcap(acc(z), cap)


def linear_kd_forward(hs, ws, bs, ht, wt, bt, labels, opts: KDOptions):
    n, v = hs.shape[0], ws.shape[0]
    loss = hs.new_empty(n, dtype=acc_dtype(hs))
    stats = hs.new_empty(n, _stats_width(opts), dtype=acc_dtype(hs))
    step = row_block(n, v, opts.chunk_bytes, _TEMPS)
    for r in range(0, n, step):
        s = slice(r, r + step)
        zs = linear_logits(hs[s], ws, bs, opts.student_softcap)
        zt = linear_logits(ht[s], wt, bt, opts.teacher_softcap)
        loss[s], stats[s] = _block_forward(zs, zt, labels[s], opts)
    return loss, stats


def head_grads(g: torch.Tensor, h: torch.Tensor, w: torch.Tensor, need, dh, dw32, db32, s: slice,
               grad_rows: torch.Tensor):
    """Consume a block's logit gradient g (rows, V) fp32: dh[s] = g @ W, dW += g^T h, db += sum g.
    Weight and bias gradients accumulate in fp32. Rows with grad_rows == 0 have g = 0 but may hold
    NaN hidden states (ignored rows): they are zeroed so that 0 * NaN does not reach dW."""
    need_dh, need_dw, need_db = need
    if need_dh:
        dh[s] = mm_into(g.to(w.dtype), w, dh.dtype)
    if need_dw:
        dw32.addmm_(g.T, torch.where((grad_rows != 0).unsqueeze(1), acc(h), 0.0))
    if need_db:
        db32.add_(g.sum(0))


def mm_into(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a @ b rounded once to `dtype` (fp32 accumulation); fp16/bf16 operands with an fp32 result use
    the GEMM's fp32 output on CUDA, fp32 operands elsewhere (no CPU kernel has that output)."""
    if a.dtype == dtype:
        return a @ b
    if dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16):
        if a.is_cuda:
            return torch.mm(a, b, out_dtype=torch.float32)
        return a.float() @ b.float()
    return (a @ b).to(dtype)


def alloc_head_grads(h, w, need, acc_out: bool = False):
    """dh (in h's dtype, or the accumulation dtype with acc_out), fp32 dW and db accumulators."""
    need_dh, need_dw, need_db = need
    dh = (torch.empty(h.shape, dtype=acc_dtype(h), device=h.device) if acc_out else torch.empty_like(h)) \
        if need_dh else None
    dw32 = torch.zeros(w.shape, dtype=acc_dtype(w), device=w.device) if need_dw else None
    db32 = torch.zeros(w.shape[0], dtype=acc_dtype(w), device=w.device) if need_db else None
    return dh, dw32, db32


def finish_head_grads(dh, dw32, db32, w, bias):
    dw = dw32.to(w.dtype) if dw32 is not None else None
    db = db32.to(bias.dtype) if db32 is not None else None
    return dh, dw, db


def linear_kd_backward(hs, ws, bs, ht, wt, bt, labels, stats, grad_rows, opts: KDOptions, need,
                       akl_weights: Optional[torch.Tensor] = None):
    n, v = hs.shape[0], ws.shape[0]
    dh, dw32, db32 = alloc_head_grads(hs, ws, need)
    step = row_block(n, v, opts.chunk_bytes, _TEMPS)
    for r in range(0, n, step):
        s = slice(r, r + step)
        zs = linear_logits(hs[s], ws, bs, opts.student_softcap)
        zt = linear_logits(ht[s], wt, bt, opts.teacher_softcap)
        g = _block_grad(zs, zt, labels[s], stats[s], grad_rows[s], opts.student_softcap, opts,
                        _weights(akl_weights, s))
        head_grads(g, hs[s], ws, need, dh, dw32, db32, s, grad_rows[s])
    return finish_head_grads(dh, dw32, db32, ws, bs)


def linear_kd_fused(hs, ws, bs, ht, wt, bt, labels, grad_rows, opts: KDOptions, need):
    """Loss and gradients in one pass (docs/backends.md, "Fused path"): per block of rows the two
    heads' logits, the loss, the logit gradient from the same logits (weighted by grad_rows), dH, dW.
    Gradients in the accumulation dtype (the frontend scales them, then rounds once)."""
    n, v = hs.shape[0], ws.shape[0]
    loss = hs.new_empty(n, dtype=acc_dtype(hs))
    dh, dw32, db32 = alloc_head_grads(hs, ws, need, acc_out=True)
    step = row_block(n, v, opts.chunk_bytes, _TEMPS)
    for r in range(0, n, step):
        s = slice(r, r + step)
        zs = linear_logits(hs[s], ws, bs, opts.student_softcap)
        zt = linear_logits(ht[s], wt, bt, opts.teacher_softcap)
        loss[s], st = _block_forward(zs, zt, labels[s], opts)
        g = _block_grad(zs, zt, labels[s], st, grad_rows[s], opts.student_softcap, opts)
        head_grads(g, hs[s], ws, need, dh, dw32, db32, s, grad_rows[s])
    return loss, dh, dw32, db32
