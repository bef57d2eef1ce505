"""linear_topk and linear_sample, torch reference (docs/semantics.md).

linear_topk : per row the k largest lp_j = z_j/T - LSE(z/T), z = softcap(h W^T + b); sorted by value
              descending, ties by the smaller id.
linear_sample: inverse CDF of softmax(z/T) at sorted uniforms u (float64): sample r is the smallest j
              with CDF(j) > u_r * CDF(V-1) (scaling by the total absorbs rounding, so a token of
              probability 0 is never drawn). Two levels, so that nothing of size V runs in float64:
                e_j   = exp(z_j/T - max z/T)                    fp32, in place (e_j = p_j * Z)
                E_b   = sum of e over column block b of _BLOCK  fp32 sums, then a float64 cumsum C_b
                draw  = block b = #{C_b <= u Z}, then in b the first j whose fp32 cumsum of e from
                        the block's start exceeds u Z - C_(b-1)
              CDF(V-1) = Z = C_(nb-1) and LSE = max + log Z. The CDF differs from the exact one by
              fp32 rounding of the e_j and of the block sums (~1e-7 relative), so a draw can differ
              from a float64 reference only when u Z falls that close to a CDF step. If rounding leaves
              u Z past the in-block cumsum, the draw is the block's last token of positive probability
              (its last token if it has none: only for u >= 1, NaN or all -inf logits).
              Per row: one max, exp and block-sum pass over V (on ~1 MiB of rows at a time, so the
              passes hit the cache), V / _BLOCK float64 sums, draws x _BLOCK fp32 in-block work.
              The logits of at most _MAX_ROWS rows go to one buffer reused for every block of rows.
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


def sort_by_value_then_id(vals: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(vals, ids) per row in descending value, equal values by increasing id (sort by id, then a
    stable sort by value). Ids only order: pass a large id for slots that must come last on ties."""
    order = ids.argsort(1)
    ids, vals = ids.gather(1, order), vals.gather(1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), ids.gather(1, order)


def topk_smallest_id_ties(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk with a defined tie order: equal values are ranked by increasing index.
    Where the k-th and (k+1)-th values differ the top-k set is unique, so only its order needs
    fixing (sort by id, then stable sort by value); other rows take the full-vocabulary path."""
    if k >= x.shape[1]:
        return _ties_full(x, k)
    vals, ids = torch.topk(x, k + 1, dim=1, sorted=True)
    tie = vals[:, k - 1] == vals[:, k]
    vals, ids = sort_by_value_then_id(vals[:, :k], ids[:, :k])
    if bool(tie.any()):                                      # host sync; inference only
        rows = tie.nonzero()[:, 0]
        vals[rows], ids[rows] = _ties_full(x[rows], k)
    return vals, ids


_MAX_ROWS = 512         # rows per block of logits: a larger buffer only adds page faults
_CACHE_BYTES = 1 << 20  # elementwise passes (max, exp, sums, LSE) run on this many bytes of rows


def _logits_into(buf: torch.Tensor, h, w, bias, cap) -> torch.Tensor:
    """linear_logits(h, w, bias, cap), written into buf[:rows] when the GEMM runs in the buffer's
    dtype (fp32 / fp64 inputs): the same operations in the same order, so the same bits, without a
    fresh (rows, V) tensor per block (its page faults cost ~10% of the GEMM)."""
    if h.dtype != buf.dtype:
        return linear_logits(h, w, bias, cap)
    z = torch.mm(h, w.T, out=buf[:h.shape[0]])
    if bias is not None:
        z.add_(bias)
    if cap is not None:
        z.div_(cap).tanh_().mul_(cap)
    return z


def _row_pieces(rows: int, v: int, itemsize: int):
    """Slices of ~_CACHE_BYTES of rows: elementwise passes over them stay in the cache."""
    sub = max(1, _CACHE_BYTES // (v * itemsize))
    return [slice(a, a + sub) for a in range(0, rows, sub)]


def linear_topk(h, w, bias, k: int, opts: KDOptions):
    """Logits of <= _MAX_ROWS rows into one reused buffer; z / T in place and the row LSEs on
    cache-sized pieces of rows (the same operations as on the whole block, so the same bits)."""
    n, v = h.shape[0], w.shape[0]
    logprobs = h.new_empty(n, k, dtype=torch.float32)
    ids = h.new_empty(n, k, dtype=torch.int64)
    lse = h.new_empty(n, dtype=torch.float32)
    step = min(row_block(n, v, opts.chunk_bytes, 6), _MAX_ROWS)
    buf = (h.new_empty(step, v) if h.dtype in (torch.float32, torch.float64)
           else h.new_empty(0, dtype=torch.float32))
    for r in range(0, n, step):
        s = slice(r, r + step)
        z = _logits_into(buf, h[s], w, bias, opts.student_softcap)   # ours: updated in place
        ls = lse[s]
        for p in _row_pieces(z.shape[0], v, z.element_size()):
            if opts.temperature != 1.0:
                z[p].div_(opts.temperature)
            ls[p] = torch.logsumexp(z[p], 1)
        vals, ids[s] = topk_smallest_id_ties(z, k)
        logprobs[s] = vals - ls.unsqueeze(1)
    return logprobs, ids, lse


_BLOCK = 64   # columns per partial sum of linear_sample (V / _BLOCK sums + draws x _BLOCK per row)


def linear_sample(h, w, bias, uniforms: torch.Tensor, opts: KDOptions):
    """Raw draws (N, draws) int64, nondecreasing per row (uniforms are sorted), and LSE (N,)."""
    n, v = h.shape[0], w.shape[0]
    d = uniforms.shape[1]
    out = torch.empty(uniforms.shape, dtype=torch.int64, device=h.device)
    lse = h.new_empty(n, dtype=torch.float32)
    nb, full = -(-v // _BLOCK), v // _BLOCK * _BLOCK
    offs = torch.arange(_BLOCK, device=h.device)
    step = min(row_block(n, v, opts.chunk_bytes, 3), _MAX_ROWS)
    buf = (h.new_empty(step, v) if h.dtype in (torch.float32, torch.float64)
           else h.new_empty(0, dtype=torch.float32))
    for r in range(0, n, step):
        s = slice(r, r + step)
        z = _logits_into(buf, h[s], w, bias, opts.student_softcap)   # ours: updated in place
        rows = z.shape[0]
        m = z.new_empty(rows, 1)
        sums = z.new_empty(rows, nb)
        for p in _row_pieces(rows, v, z.element_size()):   # a few rows at a time: cache-resident
            zz, ma = z[p], m[p]
            if opts.temperature != 1.0:
                zz.div_(opts.temperature)
            torch.amax(zz, 1, keepdim=True, out=ma)
            ma.masked_fill_(ma == float("-inf"), 0.0)                 # all -inf row: e = 0
            e = zz.sub_(ma).exp_()
            sums[p, :full // _BLOCK] = e[:, :full].unflatten(1, (full // _BLOCK, _BLOCK)).sum(2)
            if full < v:
                sums[p, -1] = e[:, full:].sum(1)
        e = z
        cdf = sums.double().cumsum_(1)                                # C_b, (rows, nb)
        total = cdf[:, -1:]
        lse[s] = (m.double() + total.log()).squeeze(1).float()
        t = uniforms[s].double() * total                              # thresholds u Z, (rows, D)
        blk = torch.searchsorted(cdf, t, right=True).clamp_max_(nb - 1)
        rest = t - cdf.gather(1, (blk - 1).clamp_min(0)).masked_fill_(blk == 0, 0.0)
        if full == v:                                                 # the draws' blocks, (rows, D, _BLOCK)
            vals = e.view(rows, nb, _BLOCK).gather(1, blk.unsqueeze(2).expand(rows, d, _BLOCK))
        else:
            cols = blk.unsqueeze(2) * _BLOCK + offs
            vals = e.gather(1, cols.clamp_max(v - 1).view(rows, -1)).view(rows, d, _BLOCK)
            vals = vals.masked_fill_(cols >= v, 0.0)
        # first in-block j with cumsum > u Z - C_(b-1); the block cumsum is fp32 like its sum E_b
        pos = (vals.cumsum(2) <= rest.float().unsqueeze(2)).sum(2)
        over = pos == _BLOCK                                          # rounding left u Z past the block
        if bool(over.any()):                                          # host sync; inference only
            last = torch.where(vals[over] > 0, offs, -1).amax(1)      # last positive e_j, -1: none
            pos[over] = torch.where(last >= 0, last, (v - 1 - blk[over] * _BLOCK).clamp_max(_BLOCK - 1))
        out[s] = blk * _BLOCK + pos
    return out, lse
