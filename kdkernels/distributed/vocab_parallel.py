"""Vocabulary-parallel (tensor-parallel) KD losses: each rank of `process_group` holds a contiguous
vocabulary shard of the logits (columns) or of the LM heads (weight rows), shards in group-rank order.

Same arguments and result as the single-process ops of kdkernels.losses plus `process_group`; every
rank gets the same loss, equal to the single-process loss over the concatenated vocabulary. Rows
(hidden states, labels, teacher ids/values) are replicated over the group.

Per forward (dense teacher): local pass 1 (per-row LSEs of b, a, z_s and the CE target logit) ->
all-reduce MAX + SUM of (N, 4) -> local pass 2 (sum f, sum qh with the global LSEs) -> all-reduce SUM
of (N, 2). Sparse teacher: one local pass (LSEs and the logits at the local cached ids) -> MAX + SUM
of (N, 4) -> elementwise terms on (N, k) -> SUM of (N, 2); the teacher's tail mass is known on every
rank from its replicated values, the student's (Q = 1 - sum_K q) comes from LSE_K(b) over ranks.
Backward: purely local for the shard's logits / weight rows; the gradient of the replicated hidden
states is the sum of the shards' partials, all-reduced once (fp32). Nothing of size N x V is
communicated or saved.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import validate as V
from ..backends.torch.sparse import log1mexp, teacher_logprobs
from ..backends.torch.terms import element_terms
from ..losses import _Rows, check_linear_args, check_logits_args, check_sparse_args
from ..options import LOG_TAIL_FLOOR, KDOptions
from . import comm
from .shard_dispatch import resolve_shard

_NEG_INF = float("-inf")


def _flatten_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """(..., c) -> (rows, c); explicit row count so that an empty shard (c = 0) flattens too."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _local_labels(ce_labels: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """Shard protocol labels: local target (>= 0), -1 no CE term, -2 CE target on another shard."""
    loc = ce_labels - start
    here = (ce_labels >= 0) & (loc >= 0) & (loc < size)
    return torch.where(here, loc, torch.where(ce_labels >= 0, -2, -1))


def _layout(group, device, sizes, check):
    """Run the local argument checks, then exchange shard sizes: every rank raises together."""
    err = None
    try:
        check()
    except (ValueError, TypeError) as e:
        err = e
    return comm.shard_layout(group, device, sizes, err)


def _cut(table, col: int, rank: int, v: int):
    """(start, local size after the vocab_size cut) of `rank` for column `col` of the size table."""
    start = sum(row[col] for row in table[:rank])
    return start, max(0, min(table[rank][col], v - start))


def _ranges_match(table, v: int, what: str) -> None:
    for r in range(len(table)):
        if _cut(table, 0, r, v) != _cut(table, 1, r, v):
            s, t = _cut(table, 0, r, v), _cut(table, 1, r, v)
            raise ValueError(f"vocab-parallel {what}: rank {r} holds student columns "
                             f"[{s[0]}, {s[0] + s[1]}) but teacher columns [{t[0]}, {t[0] + t[1]}); "
                             f"both must be sharded at the same vocabulary boundaries")


def _dense_rows(lse_loc, picked, terms_fn, rows: _Rows, ce_local, opts: KDOptions, group):
    """Combine the dense passes: per-row loss (N,) and saved stats [LSE(b), LSE(z_s), LSE(a), S]."""
    glse, picked = comm.lse_and_sum(lse_loc, picked, group)
    n = glse.shape[0]
    loss = glse.new_zeros(n)
    S = glse.new_zeros(n)
    if opts.kd_weight:
        terms = comm.row_sum(terms_fn(glse), group)
        loss, S = opts.kd_scale * terms[:, 0], terms[:, 1]
    if opts.ce_weight:
        loss = loss + opts.ce_weight * torch.where(ce_local != -1, glse[:, 1] - picked[:, 0], 0.0)
    return loss, torch.stack([glse[:, 0], glse[:, 1], glse[:, 2], S], 1)


# --------------------------------------------------------------------------------------------------
# kd_loss on logits shards


class _VPKDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, zs, zt, rows: _Rows, ce_local, mod, opts, lead_shape, group):
        lse, picked = mod.kd_shard_stats(zs, zt, ce_local, opts)
        loss_rows, stats = _dense_rows(lse, picked, lambda g: mod.kd_shard_terms(zs, zt, g, opts),
                                       rows, ce_local, opts, group)
        V.finite_loss(loss_rows, rows.mask, "student_logits or teacher_logits")
        ctx.save_for_backward(zs, zt, ce_local, rows.mask, rows.denom, stats)
        ctx.mod, ctx.opts, ctx.reduction = mod, opts, rows.reduction
        return rows.reduce(loss_rows, lead_shape)

    @staticmethod
    def backward(ctx, grad_out):
        zs, zt, ce_local, mask, denom, stats = ctx.saved_tensors
        grad_rows = _Rows.grad_rows(grad_out, ctx.reduction, mask, denom)
        g = ctx.mod.kd_shard_backward(zs, zt, ce_local, stats, grad_rows, ctx.opts)
        return (g,) + (None,) * 7


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, process_group,
            divergence: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
            alpha: float = 0.1, scale_by_temperature_squared: bool = True,
            labels: Optional[torch.Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
            normalizer=None, ce_weight: float = 0.0, kd_weight: float = 1.0,
            vocab_size: Optional[int] = None, backend: Optional[str] = None,
            chunk_bytes: Optional[int] = None) -> torch.Tensor:
    """kdkernels.kd_loss where each rank holds the columns of its vocabulary shard of both logits."""
    args, group, state = locals(), process_group, {}

    def check():
        state["device"], state["opts"] = check_logits_args(args)

    table = _layout(group, student_logits.device, (student_logits.shape[-1], teacher_logits.shape[-1]),
                    check)
    device, opts = state["device"], state["opts"]
    rank = torch.distributed.get_rank(group)
    v = V.common_vocab(sum(r[0] for r in table), sum(r[1] for r in table), vocab_size)
    _ranges_match(table, v, "kd_loss")
    start, size = _cut(table, 0, rank, v)
    lead = student_logits.shape[:-1]
    zs = _flatten_rows("student_logits", student_logits)[:, :size]
    zt = _flatten_rows("teacher_logits", teacher_logits)[:, :size]
    rows = _Rows(labels, zs.shape[0], device, opts, reduction, normalizer, v)
    mod = resolve_shard(backend, device.type, "kd_loss")
    return _VPKDLoss.apply(zs, zt.detach(), rows, _local_labels(rows.ce_labels, start, size), mod,
                           opts, lead, group)


# --------------------------------------------------------------------------------------------------
# fused_linear_kd_loss on LM-head shards


class _VPLinearKDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, rows: _Rows, ce_local, mod, opts, lead_shape, group):
        lse, picked = mod.linear_kd_shard_stats(hs, ws, bs, ht, wt, bt, ce_local, opts)
        loss_rows, stats = _dense_rows(
            lse, picked, lambda g: mod.linear_kd_shard_terms(hs, ws, bs, ht, wt, bt, g, opts),
            rows, ce_local, opts, group)
        V.finite_loss(loss_rows, rows.mask, "the hidden states or LM-head weights")
        ctx.save_for_backward(hs, ws, bs, ht, wt, bt, ce_local, rows.mask, rows.denom, stats)
        ctx.mod, ctx.opts, ctx.reduction, ctx.group = mod, opts, rows.reduction, group
        return rows.reduce(loss_rows, lead_shape)

    @staticmethod
    def backward(ctx, grad_out):
        hs, ws, bs, ht, wt, bt, ce_local, mask, denom, stats = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bs is not None and ctx.needs_input_grad[2])
        grad_rows = _Rows.grad_rows(grad_out, ctx.reduction, mask, denom)
        dh32, dw, db = ctx.mod.linear_kd_shard_backward(hs, ws, bs, ht, wt, bt, ce_local, stats,
                                                        grad_rows, ctx.opts, need)
        dh = comm.sum_(dh32, ctx.group).to(hs.dtype) if dh32 is not None else None
        return (dh, dw, db) + (None,) * 9


def fused_linear_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                         teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, *, process_group,
                         student_bias: Optional[torch.Tensor] = None,
                         teacher_bias: Optional[torch.Tensor] = None,
                         student_softcap: Optional[float] = None,
                         teacher_softcap: Optional[float] = None,
                         divergence: str = "forward_kl", temperature: float = 1.0, beta: float = 0.5,
                         alpha: float = 0.1, scale_by_temperature_squared: bool = True,
                         labels: Optional[torch.Tensor] = None, ignore_index: int = -100,
                         reduction: str = "mean", normalizer=None, ce_weight: float = 0.0,
                         kd_weight: float = 1.0, vocab_size: Optional[int] = None,
                         backend: Optional[str] = None,
                         chunk_bytes: Optional[int] = None) -> torch.Tensor:
    """kdkernels.fused_linear_kd_loss where each rank holds rows [v0, v1) of both LM heads (and biases);
    the hidden states are replicated and their gradient is summed over the group."""
    args, group, state = locals(), process_group, {}

    def check():
        state["device"], state["opts"] = check_linear_args(args)

    table = _layout(group, student_hidden.device, (student_weight.shape[0], teacher_weight.shape[0]),
                    check)
    device, opts = state["device"], state["opts"]
    rank = torch.distributed.get_rank(group)
    v = V.common_vocab(sum(r[0] for r in table), sum(r[1] for r in table), vocab_size)
    _ranges_match(table, v, "fused_linear_kd_loss")
    start, size = _cut(table, 0, rank, v)
    lead = student_hidden.shape[:-1]
    hs = _flatten_rows("student_hidden", student_hidden)
    ht = _flatten_rows("teacher_hidden", teacher_hidden)
    ws, bs = student_weight[:size], (student_bias[:size] if student_bias is not None else None)
    wt, bt = teacher_weight[:size], (teacher_bias[:size] if teacher_bias is not None else None)
    rows = _Rows(labels, hs.shape[0], device, opts, reduction, normalizer, v)
    mod = resolve_shard(backend, device.type, "fused_linear_kd_loss")
    return _VPLinearKDLoss.apply(hs, ws, bs, ht.detach(), wt.detach(),
                                 bt.detach() if bt is not None else None, rows,
                                 _local_labels(rows.ce_labels, start, size), mod, opts, lead, group)


# --------------------------------------------------------------------------------------------------
# fused_linear_sparse_kd_loss with a sharded student head


def _local_teacher(ids, vals, local_ids, opts):
    """Teacher log-probs at the local slots (-inf elsewhere) and log P, from the replicated full row."""
    lpK, lP = teacher_logprobs(vals, ids >= 0, opts)
    return lpK.masked_fill(local_ids < 0, _NEG_INF), lP


def _sparse_rows(glse, bK, ids, vals, local_ids, v: int, opts: KDOptions, group):
    """Per-row D and the stats [lse, -, h_Q, S] from the global LSEs and the local logits at ids."""
    lse = glse[:, 2] if opts.tail == "renorm_both" else glse[:, 0]
    lpK, lP = _local_teacher(ids, vals, local_ids, opts)
    local = local_ids >= 0
    fK, qhK = element_terms(lpK, bK - lse.unsqueeze(1), opts)
    DS = torch.stack([fK.masked_fill(~local, 0.0).sum(1), qhK.masked_fill(~local, 0.0).sum(1)], 1)
    DS = comm.row_sum(DS, group)
    D, S = DS[:, 0], DS[:, 1]
    hQ = torch.zeros_like(D)
    if opts.tail != "renorm_both":
        # Q = 1 - sum_K q = 1 - exp(LSE_K(b) - LSE(b)), both LSEs global.
        lQ = log1mexp(glse[:, 2] - glse[:, 0]).clamp_min(LOG_TAIL_FLOOR)
        fQ, qhQ = element_terms(lP, lQ, opts)
        full = (ids >= 0).sum(1) == v
        fQ, qhQ = fQ.masked_fill(full, 0.0), qhQ.masked_fill(full, 0.0)
        D, S = D + fQ, S + qhQ
        hQ = qhQ * torch.exp(-lQ)
    return D, lse, hQ, S


class _VPLinearSparseKDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ids, vals, local_ids, rows: _Rows, ce_local, v, mod, opts,
                lead_shape, group):
        lse, picked, bK = mod.linear_sparse_kd_shard_stats(hs, ws, bs, local_ids, ce_local, opts)
        glse, picked = comm.lse_and_sum(lse, picked, group)
        n = hs.shape[0]
        loss = glse.new_zeros(n)
        st = glse.new_zeros(n, 4)
        if opts.kd_weight:
            D, st[:, 0], st[:, 2], st[:, 3] = _sparse_rows(glse, bK, ids, vals, local_ids, v, opts, group)
            loss = opts.kd_scale * D
        if opts.ce_weight:
            loss = loss + opts.ce_weight * torch.where(ce_local != -1, glse[:, 1] - picked[:, 0], 0.0)
        st[:, 1] = glse[:, 1]
        V.finite_loss(loss, rows.mask, "student_hidden or student_weight")
        ctx.save_for_backward(hs, ws, bs, ids, vals, local_ids, ce_local, rows.mask, rows.denom, st)
        ctx.mod, ctx.opts, ctx.reduction, ctx.group = mod, opts, rows.reduction, group
        return rows.reduce(loss, lead_shape)

    @staticmethod
    def backward(ctx, grad_out):
        hs, ws, bs, ids, vals, local_ids, ce_local, mask, denom, stats = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bs is not None and ctx.needs_input_grad[2])
        grad_rows = _Rows.grad_rows(grad_out, ctx.reduction, mask, denom)
        lpK, _ = _local_teacher(ids, vals, local_ids, ctx.opts)
        dh32, dw, db = ctx.mod.linear_sparse_kd_shard_backward(hs, ws, bs, local_ids, lpK, ce_local,
                                                               stats, grad_rows, ctx.opts, need)
        dh = comm.sum_(dh32, ctx.group).to(hs.dtype) if dh32 is not None else None
        return (dh, dw, db) + (None,) * 10


def fused_linear_sparse_kd_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                teacher_ids: torch.Tensor, teacher_values: torch.Tensor, *,
                                process_group, values: str = "logprobs", tail: str = "bucket",
                                student_bias: Optional[torch.Tensor] = None,
                                student_softcap: Optional[float] = None,
                                divergence: str = "forward_kl", temperature: float = 1.0,
                                beta: float = 0.5, alpha: float = 0.1,
                                scale_by_temperature_squared: bool = True,
                                labels: Optional[torch.Tensor] = None, ignore_index: int = -100,
                                reduction: str = "mean", normalizer=None, ce_weight: float = 0.0,
                                kd_weight: float = 1.0, vocab_size: Optional[int] = None,
                                backend: Optional[str] = None,
                                chunk_bytes: Optional[int] = None) -> torch.Tensor:
    """kdkernels.fused_linear_sparse_kd_loss where each rank holds rows [v0, v1) of the student head.
    Cached ids are global; each rank handles the ids that fall in its shard."""
    args, group, state = locals(), process_group, {}

    def check():
        state["device"], state["opts"] = check_sparse_args(args)

    table = _layout(group, student_hidden.device, (student_weight.shape[0],), check)
    device, opts = state["device"], state["opts"]
    rank = torch.distributed.get_rank(group)
    total = sum(r[0] for r in table)
    v = total if vocab_size is None else V.common_vocab(total, vocab_size, vocab_size)
    start, size = _cut(table, 0, rank, v)
    lead = student_hidden.shape[:-1]
    hs = _flatten_rows("student_hidden", student_hidden)
    ids = _flatten_rows("teacher_ids", teacher_ids).long()
    vals = _flatten_rows("teacher_values", teacher_values).detach()
    if ids.shape[1] > v:
        raise ValueError(f"teacher_ids has k={ids.shape[1]} slots per row, more than the vocabulary "
                         f"size {v}")
    V.sparse_teacher(ids, vals, v, opts.values)
    ws, bs = student_weight[:size], (student_bias[:size] if student_bias is not None else None)
    rows = _Rows(labels, hs.shape[0], device, opts, reduction, normalizer, v)
    loc = ids - start
    local_ids = torch.where((ids >= 0) & (loc >= 0) & (loc < size), loc, -1)
    mod = resolve_shard(backend, device.type, "fused_linear_sparse_kd_loss")
    return _VPLinearSparseKDLoss.apply(hs, ws, bs, ids, vals, local_ids, rows,
                                       _local_labels(rows.ce_labels, start, size), v, mod, opts,
                                       lead, group)
