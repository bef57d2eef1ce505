"""What kdkernels.train.train needs to train a student sharded with FSDP2 (`fully_shard`).

Gradients. FSDP2 reduce-scatters the gradients of the parameters it manages (DTensor shards) and
AVERAGES them over the data-parallel ranks. Each rank's micro-batch losses therefore use the
normalizer n / W (n = counted tokens of the whole step, all ranks and micro-batches, W ranks):
    mean_r sum_m d(sum_{rows of r, m} loss_row / (n / W)) = d(sum_all loss_row) / n,
the gradient of the single-process step on the same global batch. A parameter FSDP does not manage
(a plain tensor) gets the same average here: all-reduce SUM, divided by W.

State. Outside a forward every managed parameter is a DTensor shard. fully_shard keeps only each
rank's shard of its own initialization, so the ranks must have initialized the same weights before
it (same seed, or load a checkpoint); start-up broadcasts rank 0's plain tensors (buffers, anything
FSDP does not manage), not the shards. Checkpoints hold FULL state dicts
(torch.distributed.checkpoint.state_dict, gathered to rank 0 on the CPU), so a checkpoint reads back
under any world size, or without FSDP.

Nothing here imports FSDP or DTensor before it is asked about a module that uses them.
"""
from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from .data_parallel import _fsdp2, call_as_forward


def is_fsdp2(model: torch.nn.Module) -> bool:
    """True if fully_shard was applied to `model` itself. Raises if it was applied to submodules only:
    the root's parameters (embeddings, final norm, the LM head) would then be plain replicated
    tensors that the loss reads outside any FSDP forward."""
    if not any(m in sys.modules for m in ("torch.distributed.fsdp",
                                          "torch.distributed._composable.fsdp")):
        return False          # nobody imported FSDP2, so nobody applied it
    fsdp_module, _ = _fsdp2()
    if fsdp_module is None:
        return False
    if isinstance(model, fsdp_module):
        return True
    if any(isinstance(m, fsdp_module) for m in model.modules()):
        raise ValueError("kdkernels.train: fully_shard was applied to submodules of the student but "
                         "not to the student itself; apply fully_shard(model) last (the root group "
                         "holds the embeddings, the final norm and the LM head)")
    return False


def micro_batch_loss(model: torch.nn.Module, batch: dict, obj, *, teacher=None, normalizer=None):
    """kdkernels.train.micro_batch_loss(...)[0] for an FSDP2 student, run inside FSDP forwards so
    that the LM head is gathered:

    - head in the root group (the usual layout, tied or not): the whole loss is one forward of the
      root;
    - head sharded on its own (fully_shard(model.lm_head) before the root; untied heads): the body
      is a forward of the root, the loss a forward of the head with the hidden states as its input
      (its gradient is then reduce-scattered as soon as the head's backward is done).

    The batch, teacher and normalizer reach the loss through closures, not as forward inputs, so a
    MixedPrecisionPolicy's input cast leaves them alone."""
    from ..train.model_parts import LMParts, final_hidden, lm_parts
    from ..train.objective import micro_batch_loss as loss_of

    def whole(m):
        return loss_of(lm_parts(m), batch, obj, teacher=teacher, normalizer=normalizer)[0]

    head = model.get_output_embeddings()
    fsdp_module, _ = _fsdp2()
    if head is model or not isinstance(head, fsdp_module):
        return call_as_forward(model, whole)

    def body(m):
        return final_hidden(lm_parts(m), batch["input_ids"], batch.get("attention_mask"))

    def head_loss(_, h):
        parts = lm_parts(model)             # reads the head's weight: unsharded in this forward
        parts = LMParts(lambda **_: (h,), parts.weight, parts.bias, parts.softcap)
        return loss_of(parts, batch, obj, teacher=teacher, normalizer=normalizer)[0]

    return call_as_forward(head, head_loss, call_as_forward(model, body))


def train_device(model: torch.nn.Module, name: str) -> torch.device:
    """The device of the shards (fully_shard placed them); `name` ("auto", "cuda", "cpu:0"...) must
    agree with it."""
    device = next(model.parameters()).device
    if name != "auto" and torch.device(name).type != device.type:
        raise ValueError(f"TrainConfig.device={name!r} but the FSDP2 student's shards are on {device}")
    return device


def _is_dtensor(t: torch.Tensor) -> bool:
    for where in ("torch.distributed.tensor", "torch.distributed._tensor"):   # public since 2.5
        cls = getattr(sys.modules.get(where), "DTensor", None)
        if cls is not None and isinstance(t, cls):
            return True
    return False


@torch.no_grad()
def sync_start(model: torch.nn.Module) -> None:
    """Every rank gets rank 0's buffers and unmanaged parameters (plain tensors). The DTensor shards
    are left alone: fully_shard kept only each rank's own shard of that rank's initialization, so
    the rest of rank 0's tensors no longer exists anywhere. The caller initializes the same weights
    on every rank before fully_shard (same seed, or a loaded checkpoint)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if not _is_dtensor(t):
            dist.broadcast(t.data, src=0)


def average_unsharded_grads(params, world: int) -> None:
    """Average over the ranks the gradients of the parameters FSDP does not manage (module docstring);
    FSDP's own reduce-scatter already averaged the DTensor ones."""
    for p in params:
        if _is_dtensor(p):
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) full state dicts on rank 0's CPU, empty dicts on the other ranks.
    A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (get_model_state_dict(model, options=opts),
            get_optimizer_state_dict(model, optimizer, options=opts))


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    model_state: dict, optimizer_state: dict) -> None:
    """Inverse of full_state: every rank passes the full dicts (read from the same checkpoint) and
    keeps its shards. A collective."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=opts)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=opts)


def scalar(t: torch.Tensor) -> float:
    """float() of a 0-dim tensor that may be a replicated DTensor (clip_grad_norm_ of DTensor
    gradients returns one)."""
    return float(t.full_tensor() if _is_dtensor(t) else t)


__all__ = ["is_fsdp2", "micro_batch_loss", "train_device", "call_as_forward", "sync_start", "average_unsharded_grads", "full_state", "load_full_state",
           "scalar"]
