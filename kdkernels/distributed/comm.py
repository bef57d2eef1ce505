"""The collectives of the vocab-parallel losses: O(N) per-row combinations, never N x V.

    lse_and_sum(x (N,m), y (N,s)) -> (LSE over ranks of x, sum over ranks of y)
        two all-reduces: MAX of x (N*m doubles), then SUM of [exp(x - max), y] (N*(m+s) doubles)
    sum_(x)      in-place all-reduce SUM (the fp32 gradient of the hidden states)
    row_sum(x)   all-reduce SUM of per-row partial sums, added in float64
    shard_layout one all-gather of a few ints per rank (+ an "arguments ok" flag), so that every rank
                 knows every shard's size and raises the same error together instead of leaving the
                 others blocked in a collective
    init_torchrun the process group of a torchrun-launched check (selfcheck.py, train_check.py)

All-reduce results are bitwise identical on every rank (gloo and NCCL), so every rank computes the
same per-row statistics, loss and normalizer.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.distributed as dist


def lse_and_sum(x: torch.Tensor, y: Optional[torch.Tensor], group) -> tuple:
    # The combination runs in float64 (O(N) values): the result then carries only the rounding of
    # the local fp32 LSEs, as the single-process LSE does, not an extra fp32 rounding on top.
    out_dtype = x.dtype
    x = x.double()
    m = x.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    # A row with no mass anywhere (all -inf) keeps LSE = -inf: shift by 0 instead of -inf.
    m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype, device=m.device))
    k = x.shape[1]
    buf = (x - m).exp()
    if y is not None:
        buf = torch.cat([buf, y.reshape(x.shape[0], -1).to(buf.dtype)], 1)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    lse = (buf[:, :k].log() + m).to(out_dtype)
    return lse, (buf[:, k:].to(out_dtype) if y is not None else None)


def sum_(x: torch.Tensor, group) -> torch.Tensor:
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def row_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over ranks of per-row partial sums (N, m), added in float64 and returned in x's dtype."""
    return sum_(x.double(), group).to(x.dtype)


class ShardArgumentError(ValueError):
    """Another rank of the group rejected its arguments (its own error says why)."""


def shard_layout(group, device: torch.device, sizes: Sequence[int], error: Optional[BaseException]):
    """All ranks' local sizes as a list (one tuple per rank, in group-rank order). If any rank passes
    an `error`, that rank re-raises it and every other rank raises ShardArgumentError."""
    world = dist.get_world_size(group)
    mine = torch.tensor([0 if error is None else 1, *sizes], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    table = torch.stack(everyone).tolist()
    if error is not None:
        raise error
    bad = [r for r, row in enumerate(table) if row[0]]
    if bad:
        raise ShardArgumentError(f"vocab-parallel loss: rank(s) {bad} of the process group rejected "
                                 f"their arguments (see their error); every rank stops here")
    return [tuple(row[1:]) for row in table]


def init_torchrun() -> tuple[torch.device, int, int]:
    """Join the group torchrun launched: NCCL on cuda:LOCAL_RANK when CUDA is available, else gloo
    on the CPU. Returns (device, rank, world size)."""
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return device, dist.get_rank(), dist.get_world_size()
