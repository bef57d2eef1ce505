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


def ce_rows(z: torch.Tensor, lse1: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Hard-label CE at T=1: lse(z) - z[label]; 0 where label < 0 (no CE term for the row)."""
    has = labels >= 0
    picked = z.gather(1, labels.clamp_min(0).unsqueeze(1)).squeeze(1)
    return torch.where(has, lse1 - picked, torch.zeros_like(lse1))


def lse_rows(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 1 with one (rows, V) temporary (all -inf rows give -inf, NaN stays NaN)."""
    m = x.amax(1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype, device=m.device))
    return (x - m).exp_().sum(1).log_().add_(m.squeeze(1))


def add_ce_grad(g: torch.Tensor, z: torch.Tensor, lse1: torch.Tensor, labels: torch.Tensor,
                weight: float) -> torch.Tensor:
    """g += weight * (softmax(z) - onehot(label)) for rows with a label (in place on g, our buffer)."""
    w = torch.where(labels >= 0, weight, 0.0).to(g.dtype).unsqueeze(1)
    g.add_((z - lse1.unsqueeze(1)).exp_().mul_(w))
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
