"""Element terms of every divergence, in log space (docs/semantics.md, "Divergences").

    f(p, q)  : the element of D = sum_i f(p_i, q_i)
    qh(p, q) : q * df/dq, up to a constant times q (the constant cancels in the gradient
               dD/db_j = qh_j - q_j * S with S = sum_i qh_i)

Inputs are log-probabilities (fp32, -inf allowed); 0 * log 0 = 0 everywhere. These functions are
shape-agnostic, so the dense path, the sparse path and the tail outcome all use them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...options import KDOptions


def _mix_log(lx: torch.Tensor, ly: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * x + (1 - w) * y) from log x and log y, without underflow."""
    return torch.logaddexp(lx + math.log(w), ly + math.log1p(-w))


def _zero_where_not(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def akl_terms(lp: torch.Tensor, lq: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """AKL's forward pieces elementwise: (f of forward KL, f of reverse KL, |p - q|); the qh of
    forward KL is -p and that of reverse KL equals its f."""
    p, q = lp.exp(), lq.exp()
    return (_zero_where_not(p != 0, p * (lp - lq)), _zero_where_not(q != 0, q * (lq - lp)),
            (p - q).abs())


def element_terms(lp: torch.Tensor, lq: torch.Tensor, opts: KDOptions,
                  akl_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (f, qh) elementwise for opts.divergence. For "akl", `akl_weights` (rows, 2) holds the
    per-row constants [w_h, w_t] and the terms are w_h * forward KL's + w_t * reverse KL's."""
    p, q = lp.exp(), lq.exp()
    has_p, has_q = p != 0, q != 0  # not "> 0": a NaN must propagate (and be reported), not vanish
    d = opts.divergence
    if d == "akl":
        wh, wt = akl_weights[:, 0:1], akl_weights[:, 1:2]
        t = _zero_where_not(has_q, q * (lq - lp))
        return wh * _zero_where_not(has_p, p * (lp - lq)) + wt * t, wt * t - wh * p
    if d == "forward_kl":
        return _zero_where_not(has_p, p * (lp - lq)), -p
    if d == "reverse_kl":
        t = _zero_where_not(has_q, q * (lq - lp))
        return t, t
    if d == "jsd":
        b = opts.beta
        lm = _mix_log(lp, lq, b)
        tq = _zero_where_not(has_q, q * (lq - lm))
        f = b * _zero_where_not(has_p, p * (lp - lm)) + (1 - b) * tq
        return f, (1 - b) * tq
    if d == "skew_forward_kl":
        a = opts.alpha
        lm = _mix_log(lp, lq, a)
        f = _zero_where_not(has_p, p * (lp - lm))
        qh = _zero_where_not(has_p, -(1 - a) * p * (lq - lm).exp())
        return f, qh
    if d == "skew_reverse_kl":
        a = opts.alpha
        lm = _mix_log(lq, lp, a)
        f = _zero_where_not(has_q, q * (lq - lm))
        qh = _zero_where_not(has_q, q * ((lq - lm) - a * (lq - lm).exp()))
        return f, qh
    if d == "tvd":
        return 0.5 * (p - q).abs(), 0.5 * q * torch.sign(q - p)
    raise AssertionError(f"unhandled divergence {d!r}")  # KDOptions already validated the name
