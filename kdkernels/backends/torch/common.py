"""Shared pieces of the torch backend: softcap, row blocking, label handling."""
from __future__ import annotations

from typing import Optional

import torch


def acc(x: torch.Tensor) -> torch.Tensor:
    """The accumulation dtype: float32 for fp32/fp16/bf16 inputs, float64 kept (for gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def softcap(x: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """z = c * tanh(x / c) (identity when cap is None)."""
    return x if cap is None else cap * torch.tanh(x / cap)


def softcap_grad(z: torch.Tensor, cap: Optional[float]) -> Optional[torch.Tensor]:
    """dz/dx = 1 - (z / c)^2 expressed through the capped value z; None for no cap."""
    return None if cap is None else 1.0 - (z / cap).square()


def row_block(n_rows: int, vocab: int, opts_bytes: int, floats_per_element: int) -> int:
    """Rows per block so that `floats_per_element` fp32 temporaries of (rows, vocab) fit the budget."""
    per_row = max(1, vocab * 4 * floats_per_element)
    return max(1, min(n_rows, opts_bytes // per_row))


def ce_rows(z: torch.Tensor, lse1: tuple[torch.Tensor, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Hard-label CE at T=1: lse(z) - z[label] with lse1 = (hi, lo) of lse_pair; 0 where label < 0
    (no CE term for the row)."""
    hi, lo = lse1
    has = labels >= 0
    picked = z.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(has, (hi - picked) + lo, torch.zeros_like(hi))


def lse_rows(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 1 with one (rows, V) temporary (all -inf rows give -inf, NaN stays NaN)."""
    hi, lo = lse_pair(x)
    return hi + lo


def lse_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logsumexp over dim 1 as an unevaluated sum hi + lo of two numbers of x's dtype.

    hi is LSE rounded to x's dtype and lo the rounding residual (|lo| <= eps |LSE| / 2). A log-prob
    formed as (x_j - hi) - lo keeps the accuracy of naive log_softmax, (x_j - max) - log(sum): x_j - hi
    is exact for the tokens that matter (Sterbenz), where x_j - LSE with LSE rounded once would carry an
    absolute error eps |LSE| into every q_j alike. |z / T| reaches hundreds with real heads at small T,
    and a systematic relative error of every q_j does not cancel in the logit gradient's sum.
    One (rows, V) temporary; all -inf rows give (-inf, 0), NaN stays NaN."""
    m = x.amax(1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype, device=m.device))
    log_s = (x - m).exp_().sum(1).log_()
    m = m.squeeze(1)
    if x.dtype == torch.float64:
        return m + log_s, torch.zeros_like(m)
    exact = m.double() + log_s.double()
    hi = exact.to(x.dtype)
    lo = (exact - hi.double()).to(x.dtype)
    return hi, torch.where(torch.isinf(hi), torch.zeros_like(lo), lo)


def log_softmax_pair(x: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """(x - hi) - lo over rows: log-probs from lse_pair's two parts (a new tensor)."""
    return (x - hi.unsqueeze(1)).sub_(lo.unsqueeze(1))


def add_ce_grad(g: torch.Tensor, z: torch.Tensor, lse1: tuple[torch.Tensor, torch.Tensor],
                labels: torch.Tensor, weight: float) -> torch.Tensor:
    """g += weight * (softmax(z) - onehot(label)) for rows with a label (in place on g, our buffer);
    lse1 = (hi, lo) of lse_pair(z)."""
    w = torch.where(labels >= 0, weight, 0.0).to(g.dtype).unsqueeze(1)
    g.add_(log_softmax_pair(z, *lse1).exp_().mul_(w))
    g.scatter_add_(1, labels.clamp_min(0).unsqueeze(1), -w)
    return g


def finish_grad(g: torch.Tensor, z: torch.Tensor, cap: Optional[float],
                grad_rows: torch.Tensor) -> torch.Tensor:
    """In place on g (our buffer): chain through the softcap and scale by the upstream per-row
    gradient; rows with a zero upstream gradient get exactly 0 (even if their logits are NaN)."""
    dcap = softcap_grad(z, cap)
    if dcap is not None:
        g.mul_(dcap)
    g.mul_(grad_rows.unsqueeze(1).to(g.dtype))
    return g.masked_fill_((grad_rows == 0).unsqueeze(1), 0.0)
