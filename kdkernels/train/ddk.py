"""Domain-aware distillation (DDK): per-domain statistics and the sampling reweighting rule.

Per domain d (an int id per example) the loop accumulates, over counted tokens,
    kd_d   = mean per-token distillation loss (reduction="none" rows of the fused loss)
    tce_d  = mean teacher cross-entropy -log p_teacher(label)
The student "lags" most where the distillation loss is large relative to how hard the domain is
for the teacher itself:
    gap_d  = kd_d / max(tce_d, eps)
Every `every` steps the domain sampling distribution becomes
    pi_d   = (1 - mix) * softmax(gap / tau)_d + mix / D
and is smoothed, w <- (1 - momentum) * w + momentum * pi (DDK's "factor smooth updating"); an
example of domain d is then drawn with probability proportional to w_d / n_d (n_d examples in d).
The uniform share `mix` keeps every domain in the batches so its statistics stay fresh.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


class DomainStats:
    def __init__(self, n_domains: int):
        self.n = n_domains
        self.reset()

    def reset(self) -> None:
        self.kd = torch.zeros(self.n, dtype=torch.float64)
        self.tce = torch.zeros(self.n, dtype=torch.float64)
        self.tokens = torch.zeros(self.n, dtype=torch.float64)

    def add(self, rows: torch.Tensor, teacher_ce: torch.Tensor, counted: torch.Tensor,
            row_domain: torch.Tensor) -> None:
        """rows, teacher_ce, counted, row_domain: (N,) tensors of one micro-batch."""
        d = row_domain.reshape(-1).cpu()
        c = counted.reshape(-1).cpu().double()
        self.kd.index_add_(0, d, rows.reshape(-1).detach().cpu().double() * c)
        self.tce.index_add_(0, d, teacher_ce.reshape(-1).cpu().double() * c)
        self.tokens.index_add_(0, d, c)

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tokens.clamp_min(1)
        return self.kd / t, self.tce / t

    def state_dict(self) -> dict:
        return {"kd": self.kd, "tce": self.tce, "tokens": self.tokens}

    def load_state_dict(self, s: dict) -> None:
        self.kd, self.tce, self.tokens = s["kd"].clone(), s["tce"].clone(), s["tokens"].clone()


def target_weights(stats: DomainStats, tau: float = 1.0, mix: float = 0.2,
                   eps: float = 1e-3) -> torch.Tensor:
    """pi_d of the module docstring; domains without tokens since the last reset keep gap 0."""
    kd, tce = stats.means()
    gap = torch.where(stats.tokens > 0, kd / tce.clamp_min(eps), 0.0)
    return (1 - mix) * torch.softmax(gap / tau, 0) + mix / stats.n


def example_weights(domain_weights: torch.Tensor, domains: Sequence[int]) -> torch.Tensor:
    """Per-example sampling weights w_d / n_d, so domain d gets total probability w_d."""
    d = torch.as_tensor(list(domains), dtype=torch.long)
    counts = torch.bincount(d, minlength=domain_weights.numel()).double().clamp_min(1)
    return (domain_weights.double() / counts)[d]


def initial_weights(domains: Sequence[int], n_domains: Optional[int] = None) -> torch.Tensor:
    """Start from the natural mixture: w_d = n_d / n."""
    d = torch.as_tensor(list(domains), dtype=torch.long)
    counts = torch.bincount(d, minlength=n_domains or int(d.max()) + 1).double()
    return counts / counts.sum()
