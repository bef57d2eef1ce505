"""Naive PyTorch versions of the ops: the (N, V) logits are materialized, then log_softmax.

These are the baselines of the benchmarks and of the demo's memory comparison (forward KL, the
"bucket" tail of docs/semantics.md for the cached teacher, mean over counted rows). Autograd keeps
the (N, V) logits and log-probs alive for backward: ~3-4 N*V floats at the peak.
"""
from __future__ import annotations

import math

import torch

LOG_FLOOR = math.log(1e-30)


def _acc(x: torch.Tensor) -> torch.Tensor:
    """fp32 arithmetic for fp16/bf16/fp32 inputs; float64 stays float64 (test references)."""
    return x if x.dtype == torch.float64 else x.float()


def _mean(rows: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    mask = labels != ignore_index
    return torch.where(mask, rows, 0.0).sum() / mask.sum().clamp_min(1)


def _ce(z: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(z, labels.clamp_min(0), reduction="none")


def kd_loss(zs, zt, labels, temperature=1.0, ce_weight=0.0):
    lq = torch.log_softmax(_acc(zs) / temperature, -1)
    lp = torch.log_softmax(_acc(zt) / temperature, -1)
    rows = (lp.exp() * (lp - lq)).sum(-1) * temperature ** 2
    if ce_weight:
        rows = rows + ce_weight * _ce(_acc(zs), labels)
    return _mean(rows, labels)


def linear_kd_loss(hs, ws, ht, wt, labels, temperature=1.0, ce_weight=0.0):
    return kd_loss(hs @ ws.T, (ht @ wt.T).detach(), labels, temperature, ce_weight)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    x = x.clamp(max=-1e-30)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def linear_sparse_kd_loss(hs, ws, ids, vals, labels, temperature=1.0, ce_weight=0.0, kd_weight=1.0):
    """Forward KL against top-k log-probs with the bucket tail, from materialized logits."""
    z = _acc(hs @ ws.T)
    rows = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    if kd_weight:
        lq_all = torch.log_softmax(z / temperature, -1)
        valid = ids >= 0
        lq = torch.where(valid, lq_all.gather(1, ids.clamp_min(0)), -torch.inf)
        lp = torch.where(valid, vals.to(z.dtype), -torch.inf)
        p = lp.exp()
        kl_k = torch.where(valid, p * (lp - torch.where(valid, lq, 0.0)), 0.0).sum(1)
        lpt = _log1mexp(torch.logsumexp(lp, 1)).clamp_min(LOG_FLOOR)
        lqt = _log1mexp(torch.logsumexp(lq, 1)).clamp_min(LOG_FLOOR)
        rows = kd_weight * temperature ** 2 * (kl_k + lpt.exp() * (lpt - lqt))
    if ce_weight:
        rows = rows + ce_weight * _ce(z, labels)
    return _mean(rows, labels)


def linear_ce_loss(hs, ws, labels):
    return _mean(_ce(_acc(hs @ ws.T), labels), labels)
