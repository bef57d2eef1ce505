"""Dense teacher, torch reference: `kd_loss` (logits given) and `fused_linear_kd_loss` (LM heads given).

Per row (docs/semantics.md):
    loss = kd_scale * sum_j f(p_j, q_j) + ce_weight * (LSE(z_s) - z_s[y])
    dloss/dz_s_j = [kd_scale / T * (qh_j - q_j S) + ce_weight * (softmax(z_s)_j - [j = y])] * dz/dx
Rows are processed in blocks whose fp32 temporaries fit opts.chunk_bytes; the backward recomputes
each block's logits, so nothing of size N x V is ever held. Saved per row: stats = [LSE(b), LSE(z_s),
LSE(a), S] (fp32, N x 4).
divergence="akl" (docs/backends.md): the loss holds the CE part only and stats are N x 9,
[LSE(b), LSE(z_s), LSE(a), S of forward KL, lse_p = LSE(a), lse_q = LSE(b), fkl, rkl, tv]; the
backward takes the per-row weights [w_h, w_t] and uses qh = w_h qh_fkl + w_t qh_rkl,
S = w_h S_fkl + w_t rkl.
"""
from __future__ import annotations

from typing import Optional

import torch

from ...options import KDOptions
from .common import acc, acc_dtype, add_ce_grad, ce_rows, finish_grad, row_block, softcap
from .terms import akl_terms, element_terms

_TEMPS = 12  # fp32 (rows, V) temporaries alive at once in the block math below


def _block_forward(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, opts: KDOptions):
    T = opts.temperature
    b, a = zs / T, zt / T
    lse_b, lse_a = torch.logsumexp(b, 1), torch.logsumexp(a, 1)
    lse1 = torch.logsumexp(zs, 1) if opts.ce_weight else torch.zeros_like(lse_b)
    loss = torch.zeros_like(lse_b)
    S = torch.zeros_like(lse_b)
    if opts.divergence == "akl":
        lp = a - lse_a.unsqueeze(1)
        fkl, rkl, tv = (t.sum(1) for t in akl_terms(lp, b - lse_b.unsqueeze(1)))
        if opts.ce_weight:
            loss = opts.ce_weight * ce_rows(zs, lse1, labels)
        s_fkl = -lp.exp().sum(1)
        return loss, torch.stack([lse_b, lse1, lse_a, s_fkl, lse_a, lse_b, fkl, rkl, tv], 1)
    if opts.kd_weight:
        f, qh = element_terms(a - lse_a.unsqueeze(1), b - lse_b.unsqueeze(1), opts)
        loss = opts.kd_scale * f.sum(1)
        S = qh.sum(1)
    if opts.ce_weight:
        loss = loss + opts.ce_weight * ce_rows(zs, lse1, labels)
    return loss, torch.stack([lse_b, lse1, lse_a, S], 1)


def _block_grad(zs: torch.Tensor, zt: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor,
                grad_rows: torch.Tensor, cap: Optional[float], opts: KDOptions,
                akl_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """d(loss)/d(pre-softcap student logits) for one block, fp32."""
    T = opts.temperature
    g = torch.zeros_like(zs)
    if opts.kd_weight:
        lq = zs / T - stats[:, 0:1]
        lp = zt / T - stats[:, 2:3]
        _, qh = element_terms(lp, lq, opts, akl_weights)
        S = stats[:, 3:4]
        if opts.divergence == "akl":    # S = w_h S_fkl + w_t rkl
            S = (akl_weights * stats[:, [3, 7]]).sum(1, keepdim=True)
        g = (qh - lq.exp() * S) * (opts.kd_scale / T)
    if opts.ce_weight:
        g = add_ce_grad(g, zs, stats[:, 1], labels, opts.ce_weight)
    return finish_grad(g, zs, cap, grad_rows)


def _stats_width(opts: KDOptions) -> int:
    return 9 if opts.divergence == "akl" else 4


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
        dh[s] = (g.to(w.dtype) @ w).to(dh.dtype)
    if need_dw:
        dw32.addmm_(g.T, torch.where((grad_rows != 0).unsqueeze(1), acc(h), 0.0))
    if need_db:
        db32.add_(g.sum(0))


def alloc_head_grads(h, w, need):
    need_dh, need_dw, need_db = need
    dh = torch.empty_like(h) if need_dh else None
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
