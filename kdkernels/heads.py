"""linear_topk and linear_sample: the teacher's distribution from its LM head, never N x V at once.

Both are inference-only (no autograd); see docs/semantics.md for exact definitions.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import validate as V
from .dispatch import resolve
from .options import KDOptions
from .losses import _options


class TopK(NamedTuple):
    logprobs: torch.Tensor   # (..., k) float32, descending; ties by smaller id
    ids: torch.Tensor        # (..., k) int64
    logsumexp: torch.Tensor  # (...,) float32, LSE of softcap(h W^T + b) / T


class Sample(NamedTuple):
    ids: torch.Tensor        # (..., m) int64, unique ids increasing, -1 padding; m <= draws
    weights: torch.Tensor    # (..., m) float32, count / draws, 0 at padding
    logsumexp: torch.Tensor  # (...,) float32


def _head_opts(temperature, softcap, chunk_bytes) -> KDOptions:
    return _options(temperature=temperature, student_softcap=softcap, chunk_bytes=chunk_bytes)


@torch.no_grad()
def linear_topk(hidden: torch.Tensor, weight: torch.Tensor, k: int, *, temperature: float = 1.0,
                bias: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                backend: Optional[str] = None, chunk_bytes: Optional[int] = None) -> TopK:
    """Top-k of log softmax(softcap(hidden @ weight.T + bias) / temperature), streaming over V."""
    V.tensor("hidden", hidden, min_ndim=1, floating=True)
    V.tensor("weight", weight, ndim=2, floating=True)
    _check_pair(hidden, weight, bias)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > weight.shape[0]:
        raise ValueError(f"k={k} exceeds the vocabulary size {weight.shape[0]}")
    device = V.same_device(hidden=hidden, weight=weight, bias=bias)
    opts = _head_opts(temperature, softcap, chunk_bytes)
    lead = hidden.shape[:-1]
    mod = resolve(backend, device.type, "linear_topk", dtype=hidden.dtype)
    lp, ids, lse = mod.linear_topk(hidden.reshape(-1, hidden.shape[-1]), weight, bias, k, opts)
    V.finite_lse(lse, "hidden, weight or bias")
    return TopK(lp.reshape(*lead, k), ids.reshape(*lead, k), lse.reshape(lead))


def _check_pair(hidden, weight, bias) -> None:
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden has size {hidden.shape[-1]} but weight is {tuple(weight.shape)} "
                         f"(expected (V, {hidden.shape[-1]}))")
    V.nonempty("hidden", hidden.shape[-1], "hidden size (last dim)")
    V.nonempty("weight", weight.shape[0], "vocabulary size V (rows)")
    V.same_dtype("hidden", hidden, "weight", weight)
    if bias is not None:
        V.tensor("bias", bias, ndim=1, floating=True)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def count_unique_sorted(draws: torch.Tensor, n_draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of nondecreasing ids -> (unique ids, count / n_draws), padded with -1 / 0."""
    n, d = draws.shape
    start = torch.ones_like(draws, dtype=torch.bool)
    start[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = start.long().cumsum(1) - 1                      # index of each draw's unique id
    width = int(slot[:, -1].max()) + 1 if n and d else 0   # host sync: output width
    ids = torch.full((n, width), -1, dtype=torch.int64, device=draws.device)
    counts = torch.zeros((n, width), dtype=torch.float32, device=draws.device)
    ids.scatter_(1, slot, draws)
    counts.scatter_add_(1, slot, torch.ones_like(slot, dtype=torch.float32))
    return ids, counts / n_draws


@torch.no_grad()
def linear_sample(hidden: torch.Tensor, weight: torch.Tensor, draws: int, *,
                  temperature: float = 1.0, generator: Optional[torch.Generator] = None,
                  bias: Optional[torch.Tensor] = None, softcap: Optional[float] = None,
                  backend: Optional[str] = None, chunk_bytes: Optional[int] = None) -> Sample:
    """`draws` samples with replacement per row from softmax(softcap(hidden @ weight.T + bias) / T),
    returned as unique ids with weights count / draws. All backends consume the same uniforms, so a
    seeded `generator` gives the same result on every backend (up to CDF rounding at boundaries)."""
    V.tensor("hidden", hidden, min_ndim=1, floating=True)
    V.tensor("weight", weight, ndim=2, floating=True)
    _check_pair(hidden, weight, bias)
    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive int, got {draws!r}")
    device = V.same_device(hidden=hidden, weight=weight, bias=bias)
    opts = _head_opts(temperature, softcap, chunk_bytes)
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    u = torch.rand(h.shape[0], draws, generator=generator, device=device, dtype=torch.float64)
    u = torch.sort(u, dim=1).values
    mod = resolve(backend, device.type, "linear_sample", dtype=hidden.dtype)
    raw, lse = mod.linear_sample(h, weight, bias, u, opts)
    V.finite_lse(lse, "hidden, weight or bias")
    ids, w = count_unique_sorted(raw, draws)
    return Sample(ids.reshape(*lead, ids.shape[1]), w.reshape(*lead, w.shape[1]), lse.reshape(lead))
