"""One autograd Function for the three loss ops (kd_loss, fused_linear_kd_loss,
fused_linear_sparse_kd_loss): the backend's forward/backward pieces, or its fused piece.

Two paths (docs/backends.md):
  - fused, for a scalar loss (reduction "mean" or "sum") that needs a gradient: the backend returns the
    per-row losses and the input gradients of d(total)/d(inputs) at upstream gradient 1 in one call
    (one logits GEMM per block of rows: 3 head GEMMs for a cached teacher, 4 for a live one, one fewer
    for a frozen head). Backward scales the saved gradients by the upstream scalar: no recompute, no
    host sync.
  - forward / backward, otherwise (reduction "none", divergence "akl", no gradient needed, or a backend
    without the fused piece): forward saves O(1) stats per row; backward recomputes the logits.
Both are first-order only: a backward run with create_graph=True (the start of a double backward, e.g.
a gradient penalty) raises instead of returning gradients that would silently count as constants.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import akl as A
from . import validate as V
from .options import KDOptions


def row_gradient(grad_out: torch.Tensor, reduction: str, mask: torch.Tensor,
                 denom: torch.Tensor) -> torch.Tensor:
    """d(total)/d(loss[i]) per row: grad_out (divided by the denominator for "mean"), 0 at ignored rows."""
    g = grad_out.to(denom.dtype) if grad_out.dtype != torch.float64 else grad_out
    g = g.reshape(-1) if reduction == "none" else g.expand(mask.shape)
    if reduction == "mean":
        g = g / denom
    return torch.where(mask, g, 0.0)


@dataclass(frozen=True)
class Op:
    """How one public op maps onto the backend contract (docs/backends.md)."""
    prefix: str               # "kd", "linear_kd", "linear_sparse_kd": names {prefix}_forward, ...
    n_grad: int               # leading tensor inputs that may need a gradient
    inputs: str               # what holds NaN when a counted row's loss is NaN (error message)
    akl_finish: Callable      # AKL's frontend pass (kdkernels/akl.py)


KD = Op("kd", 1, "student_logits or teacher_logits",
        lambda loss, stats, backend, t, opts, mask: A.finish_logits(loss, stats, t[0], t[1], opts, mask))
LINEAR_KD = Op("linear_kd", 3, "the hidden states or LM-head weights",
               lambda loss, stats, backend, t, opts, mask: A.finish_linear(loss, stats, backend, *t, opts,
                                                                          mask))
LINEAR_SPARSE_KD = Op("linear_sparse_kd", 3, "student_hidden or student_weight",
                      lambda loss, stats, backend, t, opts, mask: A.finish_sparse(loss, stats, *t, opts,
                                                                                 mask))


def use_fused(backend, op: Op, opts: KDOptions, reduction: str, need) -> bool:
    """The fused path serves scalar losses of the head ops (kd_loss has no GEMM to save, and its saved
    gradient would be an (N, V) tensor held from forward to backward)."""
    return (op is not KD and reduction != "none" and any(need) and opts.divergence != "akl"
            and hasattr(backend, f"{op.prefix}_fused"))


class KDFunction(torch.autograd.Function):
    """apply(op, backend, opts, rows, (lead_shape, grad_enabled), *tensors): tensors in the backend's
    order, the first op.n_grad of them differentiable (a None bias stays None). grad_enabled is the
    caller's grad mode (forward always runs without it): under torch.no_grad() nothing is differentiated,
    so no gradient is formed in forward either."""

    @staticmethod
    def forward(ctx, op: Op, backend, opts: KDOptions, rows, call, *tensors):
        lead_shape, grad_enabled = call
        need = tuple(grad_enabled and bool(ctx.needs_input_grad[5 + i]) and tensors[i] is not None
                     for i in range(op.n_grad))
        ctx.op, ctx.backend, ctx.opts, ctx.reduction = op, backend, opts, rows.reduction
        ctx.n_tensors = len(tensors)
        ctx.fused = use_fused(backend, op, opts, rows.reduction, need)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in tensors[:op.n_grad])
        if ctx.fused:
            unit = torch.ones((), dtype=torch.float64 if tensors[0].dtype == torch.float64 else torch.float32,
                              device=rows.denom.device)     # float64 inputs: 1 / denominator in float64
            weights = row_gradient(unit, rows.reduction, rows.mask, rows.denom)
            loss_rows, *grads = getattr(backend, f"{op.prefix}_fused")(
                *tensors, rows.ce_labels, weights, opts, need)
            V.finite_loss(loss_rows, rows.mask, op.inputs)
            ctx.save_for_backward(*grads)
            return rows.reduce(loss_rows, lead_shape)
        loss_rows, stats = getattr(backend, f"{op.prefix}_forward")(*tensors, rows.ce_labels, opts)
        w = None
        if opts.divergence == "akl":
            V.finite_loss(stats[:, -1], rows.mask, op.inputs)
            loss_rows, w = op.akl_finish(loss_rows, stats, backend, tensors, opts, rows.mask)
        V.finite_loss(loss_rows, rows.mask, op.inputs)
        ctx.save_for_backward(*tensors, rows.ce_labels, rows.mask, rows.denom, stats, w)
        ctx.need = need
        return rows.reduce(loss_rows, lead_shape)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():    # create_graph=True
            raise RuntimeError("kdkernels losses are first-order only: backward with create_graph=True "
                               "(double backward, gradient penalties) is not supported")
        op = ctx.op
        head, tail = (None,) * 5, (None,) * (ctx.n_tensors - op.n_grad)
        if ctx.fused:   # gradients at upstream 1 (fp32 for half inputs), scaled on the device, rounded
            # once to the input's dtype. Not in place: retain_graph=True may call backward again.
            grads = (None if g is None else (g * grad_out).to(d)
                     for g, d in zip(ctx.saved_tensors, ctx.dtypes))
            return (*head, *grads, *tail)
        *tensors, ce_labels, mask, denom, stats, w = ctx.saved_tensors
        grad_rows = row_gradient(grad_out, ctx.reduction, mask, denom)
        extra = {} if w is None else {"akl_weights": w}
        fn = getattr(ctx.backend, f"{op.prefix}_backward")
        if op.n_grad == 1:
            grads = (fn(*tensors, ce_labels, stats, grad_rows, ctx.opts, **extra),)
        else:
            grads = tuple(fn(*tensors, ce_labels, stats, grad_rows, ctx.opts, ctx.need, **extra))
        return (*head, *grads, *tail)


def apply(op: Op, backend, opts: KDOptions, rows, lead_shape, *tensors: Optional[torch.Tensor]):
    return KDFunction.apply(op, backend, opts, rows, (lead_shape, torch.is_grad_enabled()), *tensors)
