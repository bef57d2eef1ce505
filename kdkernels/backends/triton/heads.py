"""Host side of linear_topk and linear_sample for the triton backend (kernels in head_kernels.py)."""
from __future__ import annotations

import torch
import triton

from ...options import KDOptions
from .head_kernels import _sample_kernel, _topk_kernel
from .config import Tiles, vocab_splits
from .losses import _ieee, linear_head

MAX_K = 256


def linear_topk(h, w, bias, k: int, opts: KDOptions):
    if k > MAX_K:
        raise ValueError(f"backend='triton' linear_topk supports k <= {MAX_K}, got k={k}")
    head = linear_head(h, w, bias, opts.student_softcap)
    n, v = h.shape[0], w.shape[0]
    dev = h.device
    kp = max(16, triton.next_power_of_2(k))
    if dev.type == "cuda":
        block_n, block_v, block_h, warps = 64, 128, 64, 8
    else:
        block_n, block_v, block_h, warps = 64, 256, 64, 4
    per, splits = vocab_splits(dev, n, v, Tiles(block_n, block_v, block_h))
    keys = torch.empty((n, splits * kp), dtype=torch.int64, device=dev)
    lse = torch.empty((n, splits), dtype=torch.float32, device=dev)
    _topk_kernel[(triton.cdiv(n, block_n), splits)](
        head.x, head.sxn, head.w, head.swv, head.b, head.H, head.cap, keys, lse, n, v,
        1.0 / opts.temperature, per, splits, HAS_BIAS=head.has_bias, HAS_CAP=head.has_cap,
        IEEE=_ieee(head), KP=kp, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, num_warps=warps,
        num_stages=2)
    lse = torch.logsumexp(lse, 1)
    # keys are distinct across splits (ids differ), so the merged order is exact
    values, ids = unpack_keys(keys.sort(1, descending=True).values[:, :k])
    return values - lse.unsqueeze(1), ids, lse


def unpack_keys(keys: torch.Tensor):
    """Inverse of head_kernels._pack: (fp32 values, int64 ids)."""
    hi = (keys >> 32).to(torch.int32)
    bits = torch.where(hi >= 0, hi, hi ^ 0x7FFFFFFF)
    return bits.view(torch.float32), 0x7FFFFFFF - (keys & 0xFFFFFFFF)


def linear_sample(h, w, bias, uniforms: torch.Tensor, opts: KDOptions):
    head = linear_head(h, w, bias, opts.student_softcap)
    n, v = h.shape[0], w.shape[0]
    d = uniforms.shape[1]
    dev = h.device
    u = uniforms.to(torch.float64).contiguous()
    out = torch.empty((n, d), dtype=torch.int64, device=dev)     # every draw is written once
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    # no (rows, draws, cols) temporary any more (draws are settled by a cursor), so CUDA takes 64
    # rows per program like the other LM-head kernels: W is streamed N / 64 times, not N / 16
    # (not yet measured on a GPU); the fp64 CDF tile keeps the vocabulary tile at 64
    if dev.type == "cuda":
        block_n, block_v, block_h, block_d, warps = 64, 64, 64, 16, 8
    else:
        block_n, block_v, block_h, block_d, warps = 64, 256, 64, 64, 4
    _sample_kernel[(triton.cdiv(n, block_n),)](
        head.x, head.sxn, head.w, head.swv, head.b, head.H, head.cap, u, u.stride(0), out, lse, n, v, d,
        1.0 / opts.temperature, HAS_BIAS=head.has_bias, HAS_CAP=head.has_cap, IEEE=_ieee(head),
        BLOCK_D=min(block_d, triton.next_power_of_2(d)), BLOCK_N=block_n, BLOCK_V=block_v,
        BLOCK_H=block_h, num_warps=warps)
    return out, lse
