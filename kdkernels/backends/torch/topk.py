"""linear_topk and linear_sample, torch reference (docs/semantics.md).

linear_topk : per row the k largest lp_j = z_j/T - LSE(z/T), z = softcap(h W^T + b); sorted by value
              descending, ties by the smaller id.
linear_sample: inverse CDF of softmax(z/T) at sorted uniforms u (float64): sample r is the smallest j
              with CDF(j) > u_r * CDF(V-1) (scaling by the total absorbs rounding, so a token of
              probability 0 is never drawn).
Blocks of rows keep the (rows, V) temporaries within opts.chunk_bytes.
"""
from __future__ import annotations

import torch

from ...options import KDOptions
from .common import row_block
from .dense import linear_logits


def _ties_full(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact tie rule with full-vocabulary passes (rows whose k-th and (k+1)-th values tie)."""
    vals, _ = torch.topk(x, k, dim=1, sorted=True)
    kth = vals[:, -1:]
    above = x > kth
    ties = x == kth
    need = k - above.sum(1, keepdim=True)
    take = above | (ties & (ties.cumsum(1) <= need))
    ids = take.nonzero()[:, 1].view(x.shape[0], k)          # increasing index within each row
    picked = x.gather(1, ids)
    order = torch.sort(picked, dim=1, descending=True, stable=True).indices
    ids = ids.gather(1, order)
    return x.gather(1, ids), ids


def topk_smallest_id_ties(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk with a defined tie order: equal values are ranked by increasing index.
    Where the k-th and (k+1)-th values differ the top-k set is unique, so only its order needs
    fixing (sort by id, then stable sort by value); other rows take the full-vocabulary path."""
    if k >= x.shape[1]:
        return _ties_full(x, k)
    vals, ids = torch.topk(x, k + 1, dim=1, sorted=True)
    tie = vals[:, k - 1] == vals[:, k]
    vals, ids = vals[:, :k], ids[:, :k]
    order = ids.argsort(1)
    ids, vals = ids.gather(1, order), vals.gather(1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    ids, vals = ids.gather(1, order), vals.gather(1, order)
    if bool(tie.any()):                                      # host sync; inference only
        rows = tie.nonzero()[:, 0]
        vals[rows], ids[rows] = _ties_full(x[rows], k)
    return vals, ids


def linear_topk(h, w, bias, k: int, opts: KDOptions):
    n, v = h.shape[0], w.shape[0]
    logprobs = h.new_empty(n, k, dtype=torch.float32)
    ids = h.new_empty(n, k, dtype=torch.int64)
    lse = h.new_empty(n, dtype=torch.float32)
    step = row_block(n, v, opts.chunk_bytes, 6)
    for r in range(0, n, step):
        s = slice(r, r + step)
        z = linear_logits(h[s], w, bias, opts.student_softcap) / opts.temperature
        lse[s] = torch.logsumexp(z, 1)
        vals, ids[s] = topk_smallest_id_ties(z, k)
        logprobs[s] = vals - lse[s].unsqueeze(1)
    return logprobs, ids, lse


def linear_sample(h, w, bias, uniforms: torch.Tensor, opts: KDOptions):
    """Raw draws (N, draws) int64, nondecreasing per row (uniforms are sorted), and LSE (N,)."""
    n, v = h.shape[0], w.shape[0]
    out = torch.empty(uniforms.shape, dtype=torch.int64, device=h.device)
    lse = h.new_empty(n, dtype=torch.float32)
    step = row_block(n, v, opts.chunk_bytes, 6)
    for r in range(0, n, step):
        s = slice(r, r + step)
        z = linear_logits(h[s], w, bias, opts.student_softcap) / opts.temperature
        lse[s] = torch.logsumexp(z, 1)
        cdf = (z - lse[s].unsqueeze(1)).double().exp().cumsum(1)
        u = uniforms[s].double() * cdf[:, -1:]
        out[s] = torch.searchsorted(cdf, u, right=True).clamp_max(v - 1)
    return out, lse
