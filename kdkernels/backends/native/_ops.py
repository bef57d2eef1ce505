"""Contract functions (docs/backends.md) -> torch.ops.kdkernels_native.* (csrc/bindings.cpp).

KDOptions become the two option lists of the op schemas (csrc/ops.h): this is the one place that
encodes them. divergence="akl": the backward functions take `akl_weights` (N, 2) [w_h, w_t] (None for
every other divergence); the forward stats end with the public [lse_p, lse_q, fkl, rkl, tv].
"""
from __future__ import annotations

import torch

from ...options import DIVERGENCES, TAILS, KDOptions
from . import _loader


def _ops(device: torch.device):
    _loader.load(cuda=device.type == "cuda")
    return torch.ops.kdkernels_native


def options_lists(opts: KDOptions) -> tuple[list[float], list[int]]:
    mix = opts.beta if opts.divergence == "jsd" else opts.alpha
    fopts = [float(opts.temperature), float(mix), float(opts.kd_scale), float(opts.ce_weight),
             float(opts.student_softcap or 0.0), float(opts.teacher_softcap or 0.0)]
    iopts = [DIVERGENCES.index(opts.divergence), TAILS.index(opts.tail),
             int(opts.values == "weights"), int(opts.chunk_bytes)]
    return fopts, iopts


def _grads(out, need):
    return tuple(t if n else None for t, n in zip(out, need))


def kd_forward(zs, zt, labels, opts: KDOptions):
    return tuple(_ops(zs.device).kd_forward(zs, zt, labels, *options_lists(opts)))


def kd_backward(zs, zt, labels, stats, grad_rows, opts: KDOptions, akl_weights=None):
    return _ops(zs.device).kd_backward(zs, zt, labels, stats, grad_rows, *options_lists(opts),
                                       akl_weights)


def linear_kd_forward(hs, ws, bs, ht, wt, bt, labels, opts: KDOptions):
    return tuple(_ops(hs.device).linear_kd_forward(hs, ws, bs, ht, wt, bt, labels, *options_lists(opts)))


def linear_kd_backward(hs, ws, bs, ht, wt, bt, labels, stats, grad_rows, opts: KDOptions, need,
                       akl_weights=None):
    need = [bool(n) for n in need]
    out = _ops(hs.device).linear_kd_backward(hs, ws, bs, ht, wt, bt, labels, stats, grad_rows,
                                             *options_lists(opts), need, akl_weights)
    return _grads(out, need)


def linear_sparse_kd_forward(hs, ws, bs, ids, vals, labels, opts: KDOptions):
    return tuple(_ops(hs.device).linear_sparse_kd_forward(hs, ws, bs, ids, vals, labels,
                                                          *options_lists(opts)))


def linear_sparse_kd_backward(hs, ws, bs, ids, vals, labels, stats, grad_rows, opts: KDOptions, need,
                              akl_weights=None):
    need = [bool(n) for n in need]
    out = _ops(hs.device).linear_sparse_kd_backward(hs, ws, bs, ids, vals, labels, stats, grad_rows,
                                                    *options_lists(opts), need, akl_weights)
    return _grads(out, need)


def linear_kd_fused(hs, ws, bs, ht, wt, bt, labels, grad_rows, opts: KDOptions, need):
    need = [bool(n) for n in need]
    loss, *grads = _ops(hs.device).linear_kd_fused(hs, ws, bs, ht, wt, bt, labels, grad_rows,
                                                   *options_lists(opts), need)
    return (loss, *_grads(grads, need))


def linear_sparse_kd_fused(hs, ws, bs, ids, vals, labels, grad_rows, opts: KDOptions, need):
    need = [bool(n) for n in need]
    loss, *grads = _ops(hs.device).linear_sparse_kd_fused(hs, ws, bs, ids, vals, labels, grad_rows,
                                                          *options_lists(opts), need)
    return (loss, *_grads(grads, need))


def linear_topk(h, w, b, k: int, opts: KDOptions):
    return tuple(_ops(h.device).linear_topk(h, w, b, int(k), *options_lists(opts)))


def linear_sample(h, w, b, uniforms, opts: KDOptions):
    return tuple(_ops(h.device).linear_sample(h, w, b, uniforms, *options_lists(opts)))
