"""Data parallelism (DDP, FSDP2): the global token normalizer and the LM head under fully_shard.

Normalizer. The single-process loss of a global batch is sum_rows loss_row / n, n = counted tokens
of the whole batch (all ranks, all micro-batches). DDP and FSDP2 AVERAGE gradients over the
data-parallel ranks, so each rank's micro-batch loss must be sum_local / (n / world): then
mean_ranks(sum_micro d loss) = d(sum_all loss_row) / n exactly, whatever the token split.
`data_parallel_normalizer` returns that n / world as a 0-dim tensor (one all-reduce, no host sync),
to pass as `normalizer=` of every micro-batch's loss. The value each rank reports is then
world * (its share of the global mean); averaging the reports over ranks gives the global mean.

LM head under FSDP2. Outside a forward, an FSDP2-sharded parameter is a DTensor shard, and a fused
loss that reads `lm_head.weight` there would crash or see a shard. `call_as_forward(owner, fn, ...)`
runs `fn(owner, ...)` as a forward method of the FSDP module `owner` whose parameter group holds the
head: FSDP all-gathers the group before the call, reshards after it per its policy, and runs the
usual pre-backward all-gather and post-backward reduce-scatter for the gradients that flow through
the call. Without FSDP it simply calls fn.
"""
from __future__ import annotations

import importlib
import types
from typing import Callable

import torch
import torch.distributed as dist


def global_token_count(*labels: torch.Tensor, ignore_index: int = -100, group=None) -> torch.Tensor:
    """Counted tokens (label != ignore_index) of the given micro-batches, summed over the ranks of
    `group` (the data-parallel group; vocab-parallel ranks share rows and must not be summed).
    0-dim float32 tensor on the labels' device; an all-reduce, no host sync."""
    if not labels:
        raise ValueError("global_token_count needs the labels of at least one micro-batch")
    count = sum((lab != ignore_index).sum() for lab in labels).to(torch.float32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count


def data_parallel_normalizer(*labels: torch.Tensor, ignore_index: int = -100,
                             group=None) -> torch.Tensor:
    """`normalizer=` for each micro-batch loss under DDP/FSDP2 gradient averaging:
    max(global counted tokens, 1) / data-parallel world size (module docstring)."""
    count = global_token_count(*labels, ignore_index=ignore_index, group=group)
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    return count.clamp_min(1.0) / world


class LossForward(torch.nn.Module):
    """`LossForward(model)(fn, *args, **kwargs)` returns `fn(model, *args, **kwargs)`.

    Wrap THIS module in DistributedDataParallel (or fully_shard it) so that the whole loss, the
    LM-head read included, runs inside the wrapper's forward: DDP only all-reduces gradients of a
    backward that follows its own forward (calling model.body and a fused loss directly on a
    DDP-wrapped model leaves the gradients unsynchronized, silently)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


_METHOD = "_kdkernels_call_as_forward"
_REGISTERED = "_kdkernels_call_as_forward_fsdp"


def _call(self, fn, *args, **kwargs):
    return fn(self, *args, **kwargs)


def call_as_forward(owner: torch.nn.Module, fn: Callable, *args, **kwargs):
    """`fn(owner, *args, **kwargs)` run as a forward of `owner` (FSDP2: parameters unsharded for
    the call, gradients reduce-scattered in backward). Tensors in args/kwargs go through FSDP's
    forward-input handling (e.g. the MixedPrecisionPolicy cast), as they would in owner(...)."""
    fsdp_module, register = _fsdp2()
    is_fsdp = fsdp_module is not None and isinstance(owner, fsdp_module)
    # (Re)install the method when missing, or when fully_shard was applied after the last call.
    if _METHOD not in owner.__dict__ or (is_fsdp and not owner.__dict__.get(_REGISTERED)):
        object.__setattr__(owner, _METHOD, types.MethodType(_call, owner))
        if is_fsdp:
            register(owner, _METHOD)
        object.__setattr__(owner, _REGISTERED, is_fsdp)
    return owner.__dict__[_METHOD](fn, *args, **kwargs)


def _fsdp2():
    """(FSDPModule, register_fsdp_forward_method) of this torch (public since 2.6, under
    torch.distributed._composable.fsdp before), or (None, None) without FSDP2."""
    for where in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        try:
            mod = importlib.import_module(where)
            return mod.FSDPModule, mod.register_fsdp_forward_method
        except (ImportError, AttributeError):
            continue
    return None, None


__all__ = ["global_token_count", "data_parallel_normalizer", "call_as_forward", "LossForward"]
